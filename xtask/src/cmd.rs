//! Running the programs xtask drives (cargo, apt-get, kubectl, …).

use std::process::Command;

use anyhow::{Context as _, bail};

/// Runs a command, failing with its name when it does not succeed.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or `None` when it cannot run or fails.
pub fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sends `signal` to a child process we started. A pid that does not fit a
/// `pid_t` is an error, never 0 (which would signal our whole process group).
pub fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
    let pid = i32::try_from(child.id())
        .with_context(|| format!("pid {} does not fit a pid_t", child.id()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .with_context(|| format!("cannot send {signal} to pid {pid}"))
}
