//! Prometheus itself on MBCAS's monitoring files: `promtool check rules` and
//! `promtool test rules` on `deploy/prometheus/`, and a real Prometheus that
//! scrapes a running daemon and answers every query of the Grafana dashboard
//! (`deploy/grafana/`): a panel whose query returns no series is a defect.
//!
//! promtool and prometheus come from Debian's `prometheus` package, downloaded
//! and unpacked into `~/.cache/mbcas/bin/` rather than installed, so no
//! service starts.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::run_cmd;

/// The Debian package version promtool comes from.
pub const PROMETHEUS_DEB_VERSION: &str = "2.42.0+ds-5+deb12u1";

/// `~/.cache/mbcas/bin/{promtool,prometheus}-<version>`, downloaded and
/// unpacked when missing.
pub fn tools() -> anyhow::Result<(PathBuf, PathBuf)> {
    let bin = crate::testenv::cache_dir().join("bin");
    let upstream = PROMETHEUS_DEB_VERSION
        .split('+')
        .next()
        .unwrap_or(PROMETHEUS_DEB_VERSION);
    let promtool = bin.join(format!("promtool-{upstream}"));
    let server = bin.join(format!("prometheus-{upstream}"));
    if promtool.exists() && server.exists() {
        eprintln!("setup: promtool and prometheus {upstream} cached");
        return Ok((promtool, server));
    }
    eprintln!("setup: unpacking promtool from Debian's prometheus {PROMETHEUS_DEB_VERSION}");
    let work = crate::testenv::cache_dir().join("prometheus-deb");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("mkdir {}", work.display()))?;
    run_cmd(
        Command::new("apt-get")
            .args(["download", &format!("prometheus={PROMETHEUS_DEB_VERSION}")])
            .current_dir(&work),
    )?;
    let deb = std::fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let root = work.join("root");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::create_dir_all(&bin).with_context(|| format!("mkdir {}", bin.display()))?;
    for (from, to) in [("promtool", &promtool), ("prometheus", &server)] {
        std::fs::copy(root.join("usr/bin").join(from), to)
            .with_context(|| format!("install {}", to.display()))?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok((promtool, server))
}

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

/// `promtool check rules` and `promtool test rules` on the shipped rules.
pub fn check_rules() -> anyhow::Result<()> {
    let (promtool, _) = tools()?;
    let dir = monitoring_dir();
    let rules = dir.join("mbcas-rules.yaml");
    if !rules.exists() {
        bail!("{} is missing", rules.display());
    }
    run_cmd(Command::new(&promtool).args(["check", "rules"]).arg(&rules))?;
    run_cmd(
        Command::new(&promtool)
            .args(["test", "rules", "mbcas-rules.test.yaml"])
            .current_dir(&dir),
    )?;
    run_cmd(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(dir.join(SCORING_RULES)),
    )?;
    run_cmd(
        Command::new(&promtool)
            .args(["test", "rules", "mbcas-scoring-rules.test.yaml"])
            .current_dir(&dir),
    )?;
    println!(
        "prometheus: alerting rules and {} node scores checked and unit-tested (promtool)",
        score_records()?.len()
    );
    Ok(())
}

/// A Prometheus server we started, stopped on drop.
struct Server {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `(panel title, expr)` of the dashboard, `$instance` as "all".
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/mbcas-dashboard.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((title.to_owned(), expr.replace("$instance", ".*")));
            }
        }
    }
    if out.is_empty() {
        bail!("{}: no queries", path.display());
    }
    Ok(out)
}

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` from the server; the body when the status is 200.
fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    // Prometheus answers small bodies in one piece, larger ones chunked.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        return Ok(out);
    }
    Ok(body.to_owned())
}

/// Starts Prometheus scraping `target` (job `mbcas`) every second, lets it
/// scrape for `scrape_for`, then runs every dashboard query (and `up`).
/// Returns how many queries answered, or fails naming those that returned no
/// series.
pub fn check_dashboard(
    target: std::net::SocketAddr,
    scrape_for: std::time::Duration,
) -> anyhow::Result<usize> {
    let (_, server) = tools()?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/prometheus-check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data"))
        .with_context(|| format!("mkdir {}", dir.display()))?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n  - {}\nscrape_configs:\n  - job_name: mbcas\n    static_configs:\n      - targets: ['{target}']\n",
            monitoring_dir().join("mbcas-rules.yaml").display(),
            monitoring_dir().join(SCORING_RULES).display()
        ),
    )
    .with_context(|| format!("write {}", config.display()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let child = Command::new(&server)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", server.display()))?;
    let srv = Server { child, addr };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while get(srv.addr, "/-/ready").is_err() {
        if std::time::Instant::now() > deadline {
            bail!(
                "Prometheus not ready after 60 s (log: {})",
                dir.join("prometheus.log").display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    eprintln!("prometheus: scraping {target} for {scrape_for:?}");
    std::thread::sleep(scrape_for);
    let mut queries = vec![(
        "scrape target".to_owned(),
        "up{job=\"mbcas\"} == 1".to_owned(),
    )];
    queries.extend(dashboard_queries()?);
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let body = get(srv.addr, &format!("/api/v1/query?query={}", encode(expr)))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("{title}: {expr}: not JSON: {body}"))?;
        let n = v["data"]["result"].as_array().map_or(0, Vec::len);
        eprintln!("prometheus: {n:>3} series  {title}: {expr}");
        if n == 0 {
            empty.push(format!("{title}: {expr}"));
        }
    }
    if !empty.is_empty() {
        bail!(
            "{} of {} dashboard queries returned no series:\n  {}",
            empty.len(),
            queries.len(),
            empty.join("\n  ")
        );
    }
    println!(
        "prometheus: {} queries (the dashboard's and `up`) answered with series",
        queries.len()
    );
    // Every node score names this node (not the scrape address) and lies in 0..1.
    let scores = score_records()?;
    let mut wrong = Vec::new();
    for record in &scores {
        let body = get(srv.addr, &format!("/api/v1/query?query={}", encode(record)))?;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("{record}: not JSON: {body}"))?;
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        let found: Vec<(String, f64)> = result
            .iter()
            .map(|r| {
                let instance = r["metric"]["instance"].as_str().unwrap_or("").to_owned();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (instance, value)
            })
            .collect();
        eprintln!("prometheus: {record}: {found:?}");
        let good = found.len() == 1
            && found
                .iter()
                .all(|(i, v)| !i.is_empty() && !i.contains(':') && (0.0..=1.0).contains(v));
        if !good {
            wrong.push(format!("{record}: {found:?}"));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "node scores not one series per node, named by the node, in 0..1:\n  {}",
            wrong.join("\n  ")
        );
    }
    println!(
        "prometheus: {} node scores, each one series named by the node, in 0..1",
        scores.len()
    );
    Ok(queries.len() + scores.len())
}

/// The node scores' rule file in deploy/prometheus.
const SCORING_RULES: &str = "mbcas-scoring-rules.yaml";

/// The names of the node score records (`mbcas:node_score:*`).
fn score_records() -> anyhow::Result<Vec<String>> {
    let path = monitoring_dir().join(SCORING_RULES);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .filter(|n| n.starts_with("mbcas:node_score:"))
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        bail!("{} records no mbcas:node_score:*", path.display());
    }
    Ok(names)
}
