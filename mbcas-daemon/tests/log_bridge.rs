//! `log` records (what aya-log's `EbpfLogger` emits for the eBPF programs) reach
//! the daemon's tracing subscriber: formatted, filtered, in JSON when asked.
//! Its own test binary: it installs the process-global subscriber.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use mbcas::telemetry::{LogFormat, init_with_writer};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[test]
fn log_crate_records_are_bridged_into_tracing_json() {
    let buf = Buffer::default();
    init_with_writer("info,mbcas_ebpf=debug", LogFormat::Json, buf.clone()).unwrap();
    log::debug!(target: "mbcas_ebpf", "period timer for cgroup {} throttled", 4242);
    log::trace!(target: "mbcas_ebpf", "filtered out");
    log::debug!(target: "other", "filtered out too");
    let text = String::from_utf8(buf.0.lock().unwrap_or_else(|p| p.into_inner()).clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(
        lines[0]["fields"]["message"],
        "period timer for cgroup 4242 throttled"
    );
    assert_eq!(lines[0]["target"], "mbcas_ebpf");
    assert_eq!(lines[0]["level"], "DEBUG");
    // A second subscriber cannot be installed: said, not panicked.
    assert!(init_with_writer("info", LogFormat::Text, Buffer::default()).is_err());
}

/// Set in the child process that [`text_format_goes_to_the_writer_and_rust_log_wins`] starts.
const CHILD: &str = "MBCAS_LOG_BRIDGE_CHILD";

/// One subscriber per process: the text-format checks run in a child process
/// of this test binary, with `RUST_LOG` set for it alone.
#[test]
fn text_format_goes_to_the_writer_and_rust_log_wins() {
    if std::env::var_os(CHILD).is_some() {
        let buf = Buffer::default();
        // RUST_LOG (warn,mbcas_ebpf=debug) wins over the level passed here.
        init_with_writer("info", LogFormat::Text, buf.clone()).unwrap();
        assert!(
            mbcas::telemetry::ebpf_debug_enabled(),
            "RUST_LOG asks for the eBPF programs' debug records"
        );
        tracing::warn!("warning to the writer");
        tracing::info!("info filtered out by RUST_LOG");
        let text =
            String::from_utf8(buf.0.lock().unwrap_or_else(|p| p.into_inner()).clone()).unwrap();
        assert!(text.contains("warning to the writer"), "{text:?}");
        assert!(!text.contains("info filtered out"), "{text:?}");
        assert!(
            !text.contains('\x1b'),
            "no colours in a captured log: {text:?}"
        );
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "text_format_goes_to_the_writer_and_rust_log_wins",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("RUST_LOG", "warn,mbcas_ebpf=debug")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
