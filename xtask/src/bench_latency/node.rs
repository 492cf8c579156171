//! `cargo xtask bench-latency --node`: the same four phases with the server
//! and its neighbour as pods on the test environment's real node (kubelet,
//! containerd, the node's cgroups), MBCAS as its DaemonSet.
//!
//! The server is the host's Debian nginx in an image made here (the binary,
//! the libraries `ldd` lists, a configuration, the page), imported into the
//! node's containerd; the neighbour runs `mbcas burn --threads 2` in the
//! DaemonSet's image. Each phase creates both pods in namespace
//! `mbcas-latency` (the server requests 1000 m, the neighbour 500 m: the
//! weights of the local tree) and deletes them after; vegeta runs on the
//! host and sends to the server pod's IP over the node's bridge. In the
//! `alone`, `static` and `nolimits` phases the pods carry `mbcas.io/ignore`
//! (the DaemonSet runs but leaves them alone); in `mbcas` it manages them,
//! starting from the static limits. Counters are read from the containers'
//! cgroups on the node (this machine).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{Counters, Group, Stage, counters, nginx_conf, page, phase_limits};
use crate::{
    e2e::{self, Cluster as _},
    testenv::node::{NODE_NAME, TestNode},
};

const NS: &str = "mbcas-latency";
const NGINX_IMAGE: &str = "mbcas.test/nginx:bench";
const SERVER_PORT: u16 = 8080;
const SERVER: &str = "server";
const NOISY: &str = "noisy";

struct NodeStage {
    node: TestNode,
    roots: crate::host::CgroupRoots,
    work: PathBuf,
    ip: String,
    /// The containers' cgroups, while their pods run.
    server: Option<Group>,
    noisy: Option<Group>,
}

/// Brings the test node up when it is down, deploys MBCAS, builds and
/// imports the server's image, runs `body` and takes everything down again
/// (the test environment only when it started it).
pub(super) fn run<T>(
    work: PathBuf,
    body: impl FnOnce(&mut dyn Stage) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let (_, started) = crate::testenv::up(true, true)?;
    let result = (|| {
        let node = TestNode::running()?;
        crate::bench_node::deploy(&node)?;
        import_nginx(&node, &work)?;
        let _ = e2e::kubectl(&node, &["delete", "namespace", NS, "--wait=true"]);
        e2e::kubectl(&node, &["create", "namespace", NS])?;
        let mut stage = NodeStage {
            roots: crate::host::CgroupRoots::detect()?,
            node,
            work,
            ip: String::new(),
            server: None,
            noisy: None,
        };
        let out = body(&mut stage);
        let _ = stage.leave();
        let _ = e2e::kubectl(&stage.node, &["delete", "namespace", NS, "--wait=false"]);
        out
    })();
    if started {
        crate::testenv::down()?;
    }
    result
}

/// The server's image: nginx, its libraries, a user database for its
/// workers, the configuration and the page.
fn import_nginx(node: &TestNode, work: &Path) -> anyhow::Result<()> {
    let nginx = PathBuf::from("/usr/sbin/nginx");
    let src = work.join("image");
    std::fs::create_dir_all(&src)?;
    let text_files = [
        (
            "nginx.conf",
            "/etc/nginx/nginx.conf",
            nginx_conf(
                &format!("0.0.0.0:{SERVER_PORT}"),
                Path::new("/tmp"),
                Path::new("/srv"),
            ),
        ),
        ("page.txt", "/srv/page.txt", page()),
        (
            "passwd",
            "/etc/passwd",
            "root:x:0:0:root:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_owned(),
        ),
        (
            "group",
            "/etc/group",
            "root:x:0:\nnobody:x:65534:\nnogroup:x:65534:\n".to_owned(),
        ),
        (
            "nsswitch.conf",
            "/etc/nsswitch.conf",
            "passwd: files\ngroup: files\n".to_owned(),
        ),
    ];
    let mut files = vec![(nginx.clone(), nginx.clone())];
    for (name, dest, text) in &text_files {
        let at = src.join(name);
        std::fs::write(&at, text).with_context(|| format!("write {}", at.display()))?;
        files.push((at, PathBuf::from(dest)));
    }
    for lib in crate::cmd::shared_libraries(&nginx)? {
        let real = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.clone());
        files.push((real, lib));
    }
    node.import_image(
        NGINX_IMAGE,
        &files,
        &[
            "/usr/sbin/nginx",
            "-e",
            "stderr",
            "-c",
            "/etc/nginx/nginx.conf",
            "-g",
            "daemon off;",
        ],
    )
}

/// A pod of one container with the CPU `request` and `limit` (`None`: no
/// limit), left alone by MBCAS unless `managed`.
fn pod(
    name: &str,
    image: &str,
    args: &[&str],
    request: u64,
    limit: Option<u64>,
    managed: bool,
) -> Value {
    let mut limits = json!({"memory": "128Mi"});
    if let Some(l) = limit {
        limits["cpu"] = json!(format!("{l}m"));
    }
    let mut p = e2e::pod(
        NS,
        name,
        vec![json!({
            "name": name,
            "image": image,
            "imagePullPolicy": "Never",
            "args": args,
            "resources": {
                "requests": {"cpu": format!("{request}m"), "memory": "32Mi"},
                "limits": limits,
            },
        })],
    );
    if !managed {
        // The daemon's `IGNORE_LABEL`.
        p["metadata"]["labels"]["mbcas.io/ignore"] = json!("true");
    }
    p
}

impl NodeStage {
    /// The cgroup directories of pod `name`'s only container.
    fn dirs(&self, name: &str) -> anyhow::Result<Group> {
        let view = e2e::pod_view(&self.node, NS, name)?;
        let id = &e2e::first(&view)?.id;
        let cpu = PathBuf::from(e2e::cgroup_dir(&self.node, NODE_NAME, id)?);
        let acct = match &self.roots.cpuacct {
            Some(a) => Some(a.join(cpu.strip_prefix(&self.roots.cpu).with_context(|| {
                format!("{} not below {}", cpu.display(), self.roots.cpu.display())
            })?)),
            None => None,
        };
        Ok(Group { cpu, acct })
    }

    fn read(&self, g: Option<&Group>) -> anyhow::Result<Counters> {
        g.map_or(Ok((0, 0, 0, 0)), |g| counters(g, self.roots.v2))
    }
}

impl Stage for NodeStage {
    fn enter(&mut self, phase: &'static str) -> anyhow::Result<()> {
        let (server, noisy) = phase_limits(phase);
        let managed = phase == "mbcas";
        e2e::apply(
            &self.node,
            &pod(SERVER, NGINX_IMAGE, &[], 1000, server, managed),
        )?;
        if phase != "alone" {
            e2e::apply(
                &self.node,
                &pod(
                    NOISY,
                    self.node.image(),
                    &["burn", "--threads", "2"],
                    500,
                    noisy,
                    managed,
                ),
            )?;
        }
        e2e::wait_pods_ready(&self.node, NS, "120s")?;
        self.ip = e2e::kubectl(
            &self.node,
            &[
                "-n",
                NS,
                "get",
                "pod",
                SERVER,
                "-o",
                "jsonpath={.status.podIP}",
            ],
        )?
        .trim()
        .to_owned();
        if self.ip.is_empty() {
            bail!("the server pod has no IP");
        }
        self.server = Some(self.dirs(SERVER)?);
        self.noisy = if phase == "alone" {
            None
        } else {
            Some(self.dirs(NOISY)?)
        };
        let addr = format!("{}:{SERVER_PORT}", self.ip);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "nginx in the server pod did not answer on {addr} within 20 s ({})",
                    e2e::kubectl(&self.node, &["-n", NS, "logs", SERVER]).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn leave(&mut self) -> anyhow::Result<()> {
        self.server = None;
        self.noisy = None;
        e2e::kubectl(
            &self.node,
            &[
                "-n",
                NS,
                "delete",
                "pod",
                "--all",
                "--wait=true",
                "--timeout=60s",
            ],
        )?;
        Ok(())
    }

    fn url(&self) -> String {
        format!("http://{}:{SERVER_PORT}/page.txt", self.ip)
    }

    fn counters(&self) -> anyhow::Result<(Counters, Counters)> {
        Ok((
            self.read(self.server.as_ref())?,
            self.read(self.noisy.as_ref())?,
        ))
    }

    fn work(&self) -> &Path {
        &self.work
    }

    fn describe(&self) -> String {
        format!(
            "pods on the test node (kubelet {}, containerd, cgroup {}), MBCAS as its DaemonSet",
            crate::testenv::kubernetes_version(),
            if self.roots.v2 { "v2" } else { "v1" }
        )
    }
}
