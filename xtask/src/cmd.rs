//! Running the programs xtask drives (cargo, apt-get, kubectl, …).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

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

/// The shared libraries `ldd` says `exe` loads, with the dynamic loader.
pub fn shared_libraries(exe: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = output_of(Command::new("ldd").arg(exe))
        .with_context(|| format!("ldd {}", exe.display()))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        // What ldd prints, fed through the parser via a fake executable is not
        // possible; check the real one on a binary every machine has.
        let libs = shared_libraries(Path::new("/bin/sh")).unwrap_or_default();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(libs.iter().all(|l| l.is_absolute()));
    }
}
