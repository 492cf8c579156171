//! The decision core (`market/`, `demand/`, `policy/`) is pure: no I/O, no
//! clock, no runtime. The daemon, local mode and the simulator drive the same
//! code with their own time and counters, so an import of tokio, kube, aya, the
//! file system, the network, processes or the wall clock there is a defect.
// Test helpers: an unwrap that fails is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

const FORBIDDEN: [&str; 11] = [
    "tokio",
    "kube",
    "k8s_openapi",
    "aya",
    "std::fs",
    "std::net",
    "std::process",
    "std::io",
    "std::thread",
    "Instant",
    "SystemTime",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn market_demand_and_policy_do_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for module in ["market", "demand", "policy"] {
        sources(&src.join(module), &mut files);
    }
    assert!(
        files.len() >= 6,
        "the core's files were not found: {files:?}"
    );
    let mut found = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                let hit = code.match_indices(word).any(|(i, _)| {
                    let before = code[..i].chars().next_back();
                    let after = code[i + word.len()..].chars().next();
                    let ident =
                        |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                    !ident(before) && !ident(after)
                });
                if hit {
                    found.push(format!("{}:{}: {word}: {line}", f.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "I/O in the pure core:\n{}",
        found.join("\n")
    );
}
