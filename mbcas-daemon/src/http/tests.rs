//! Tests over a real loopback socket with a minimal HTTP/1.1 client.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};

use super::*;
use crate::{metrics::openmetrics, units::MilliCpu};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("no reply to {path} within 10 s"))
        .unwrap_or_else(|e| panic!("read: {e}"));
    let text = String::from_utf8(raw).unwrap_or_else(|e| panic!("reply not UTF-8: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let mut body = body.to_owned();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("bad chunk");
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

struct Server {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), HttpError>>,
}

async fn start(metrics: Metrics, readiness: Readiness) -> Server {
    let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(serve(listener, metrics, readiness, cancel.clone()));
    Server { addr, cancel, task }
}

impl Server {
    async fn stop(self) {
        self.cancel.cancel();
        let res = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap_or_else(|_| panic!("server did not stop within 10 s of cancel"));
        res.unwrap_or_else(|e| panic!("server task: {e}"))
            .unwrap_or_else(|e| panic!("server: {e}"));
    }
}

#[tokio::test]
async fn metrics_endpoint_serves_openmetrics() {
    let metrics = Metrics::new();
    let pod = crate::metrics::PodLabels::new("default", "web");
    metrics.set_pod_allocation(&pod, MilliCpu(250));
    metrics.inc_decision("increase");
    let srv = start(metrics.clone(), Readiness::new(&[])).await;

    let r = request(srv.addr, "GET", "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let e = openmetrics::parse(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body));
    assert_eq!(
        e.value("mbcas_pod_allocation_cores", &[("pod", "web")]),
        Some(0.25)
    );
    // A pod that goes disappears from the next scrape.
    metrics.remove_pod(&pod);
    let r = request(srv.addr, "GET", "/metrics").await;
    let e = openmetrics::parse(&r.body).unwrap();
    assert_eq!(e.samples("mbcas_pod_allocation_cores").count(), 0);
    assert_eq!(
        e.value("mbcas_decisions_total", &[("reason", "increase")]),
        Some(1.0)
    );
    srv.stop().await;
}

#[tokio::test]
async fn readyz_flips_only_when_every_component_is_ready() {
    let readiness = Readiness::new(&[Component::Sensor, Component::Pods]);
    let srv = start(Metrics::new(), readiness.clone()).await;

    let r = request(srv.addr, "GET", "/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "sensor: not ready\npods: not ready\n");
    assert_eq!(request(srv.addr, "GET", "/healthz").await.status, 200);

    readiness.mark_ready(Component::Sensor).unwrap();
    let r = request(srv.addr, "GET", "/readyz").await;
    assert_eq!(r.status, 503, "sensor alone is not enough");
    assert_eq!(r.body, "pods: not ready\n");

    readiness.mark_ready(Component::Pods).unwrap();
    let r = request(srv.addr, "GET", "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    // Losing a component makes the daemon unready again.
    readiness.set(Component::Pods, false).unwrap();
    assert_eq!(request(srv.addr, "GET", "/readyz").await.status, 503);
    srv.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_are_rejected() {
    let srv = start(Metrics::new(), Readiness::new(&[])).await;
    assert_eq!(request(srv.addr, "GET", "/nope").await.status, 404);
    assert_eq!(request(srv.addr, "POST", "/metrics").await.status, 405);
    srv.stop().await;
}

#[tokio::test]
async fn cancel_stops_the_server_and_frees_the_port() {
    let srv = start(Metrics::new(), Readiness::new(&[])).await;
    let addr = srv.addr;
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
    srv.stop().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "port still accepts connections after shutdown"
    );
}

#[tokio::test]
async fn bind_error_names_the_address() {
    let first = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let addr = first.local_addr().unwrap();
    let err = bind(addr).await.expect_err("second bind succeeded");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[test]
fn unknown_readiness_component_is_an_error() {
    let r = Readiness::new(&[Component::Sensor]);
    assert!(matches!(
        r.mark_ready(Component::Node),
        Err(HttpError::UnknownComponent { component: "node" })
    ));
    assert!(!r.is_ready());
    assert!(Readiness::new(&[]).is_ready());
}
