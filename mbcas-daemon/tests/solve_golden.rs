//! Golden cases for `mbcas solve`: every `NAME.in.json` under `tests/golden/solve/`
//! is fed to the real binary. `NAME.out.json` holds the expected stdout (compared
//! as JSON); `NAME.err` holds text the error message must contain, and then the
//! exit code must be 2 with nothing on stdout.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/solve")
}

fn run_solve(input: &[u8], via_file: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mbcas"));
    cmd.arg("solve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match via_file {
        Some(path) => {
            cmd.arg("--input").arg(path).stdin(Stdio::null());
            cmd.output().unwrap_or_else(|e| panic!("run mbcas: {e}"))
        }
        None => {
            let mut child = cmd
                .stdin(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn mbcas: {e}"));
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(input)
                    .unwrap_or_else(|e| panic!("write stdin: {e}"));
            }
            child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("wait mbcas: {e}"))
        }
    }
}

#[test]
fn golden_cases() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap_or_else(|e| panic!("read golden dir: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".in.json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "golden cases missing: {cases:?}");
    let (mut valid, mut invalid) = (0, 0);
    for input_path in cases {
        let name = input_path
            .to_string_lossy()
            .trim_end_matches(".in.json")
            .to_owned();
        let input = std::fs::read(&input_path).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Alternate between stdin and --input so both paths are covered.
        let out = if (valid + invalid) % 2 == 0 {
            run_solve(&input, None)
        } else {
            run_solve(&input, Some(&input_path))
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected_out = PathBuf::from(format!("{name}.out.json"));
        let expected_err = PathBuf::from(format!("{name}.err"));
        if expected_out.exists() {
            valid += 1;
            assert!(out.status.success(), "{name}: failed: {stderr}");
            let got: serde_json::Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{name}: stdout not JSON ({e}): {stdout}"));
            let want: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&expected_out).unwrap_or_else(|e| panic!("{name}: {e}")),
            )
            .unwrap_or_else(|e| panic!("{name}: expected not JSON: {e}"));
            assert_eq!(got, want, "{name}");
        } else {
            invalid += 1;
            let needle = std::fs::read_to_string(&expected_err)
                .unwrap_or_else(|e| panic!("{name}: neither .out.json nor .err ({e})"));
            assert_eq!(
                out.status.code(),
                Some(2),
                "{name}: exit code; stderr {stderr}"
            );
            assert!(
                stdout.is_empty(),
                "{name}: stdout must be empty, got {stdout}"
            );
            assert!(
                stderr.contains(needle.trim()),
                "{name}: stderr {stderr:?} lacks {:?}",
                needle.trim()
            );
        }
    }
    assert!(
        valid >= 5 && invalid >= 10,
        "valid {valid}, invalid {invalid}"
    );
}

#[test]
fn missing_input_file_is_an_io_error_not_invalid_input() {
    let out = run_solve(b"", Some(Path::new("/nonexistent/mbcas-solve.json")));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/mbcas-solve.json"));
}
