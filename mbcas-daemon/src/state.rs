//! The decision state kept across daemon restarts (`--state-file`).
//!
//! Each pod's demand history, throttle memory and the policy's state
//! (cooldowns, holds) live in the engine's memory; a restarted daemon without
//! them starts every pod afresh: warm-up, no peak, no memory of a throttle
//! episode, no cooldown. The decision loop writes them to a file on the node
//! every [`SAVE_EVERY`] and when it stops, and reads them back when it starts.
//!
//! On the node, not in the PodAllocations: the state changes every round,
//! and writing it to the API server would cost a write per pod per round
//! (MBCAS aims at none on a quiet node); only this node's daemon reads it; a
//! `hostPath` directory outlives the DaemonSet's pods, upgrades included.
//!
//! The file is JSON (`version`, `savedAtUnixMs`, `consumers`), written to a
//! temporary file beside it and renamed over it, so a crash mid-write leaves
//! the last whole state. A state older than [`MAX_AGE`] is not used (the pods'
//! loads have moved on); a missing file is a first start; an unreadable or
//! malformed one is reported and the daemon starts afresh (and overwrites it).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::engine::SavedConsumer;

/// The format this daemon writes and reads.
pub const VERSION: u32 = 1;
/// How often the loop saves its state.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);
/// A state saved longer ago than this is not used.
pub const MAX_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateDoc {
    version: u32,
    saved_at_unix_ms: u64,
    consumers: Vec<SavedConsumer>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading the saved state {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a saved state", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has state format {found}; this daemon reads {VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("writing the state to {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What was found at the state file's path.
#[derive(Debug, PartialEq)]
pub enum Loaded {
    /// No file: a first start.
    Absent,
    /// Saved this long ago, more than [`MAX_AGE`] (or in the future).
    Stale(Duration),
    /// The consumers' state, saved this long ago.
    Fresh(Vec<SavedConsumer>, Duration),
}

/// Milliseconds since the Unix epoch now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads the state at `path`, judged at `now_unix_ms`.
pub fn load(path: &Path, now_unix_ms: u64) -> Result<Loaded, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Absent),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    // The version first: a newer format may not parse as this one.
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let parse = |source| StateError::Parse {
        path: path.to_owned(),
        source,
    };
    let v: Version = serde_json::from_str(&text).map_err(parse)?;
    if v.version != VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: v.version,
        });
    }
    let doc: StateDoc = serde_json::from_str(&text).map_err(parse)?;
    let Some(age) = now_unix_ms.checked_sub(doc.saved_at_unix_ms) else {
        return Ok(Loaded::Stale(Duration::ZERO));
    };
    let age = Duration::from_millis(age);
    if age > MAX_AGE {
        return Ok(Loaded::Stale(age));
    }
    Ok(Loaded::Fresh(doc.consumers, age))
}

/// Writes the state to `path` atomically (a temporary file beside it, then a
/// rename), creating its directory if needed.
pub fn save(
    path: &Path,
    consumers: Vec<SavedConsumer>,
    now_unix_ms: u64,
) -> Result<(), StateError> {
    let write = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let doc = StateDoc {
        version: VERSION,
        saved_at_unix_ms: now_unix_ms,
        consumers,
    };
    let text = serde_json::to_vec(&doc).map_err(|e| write(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(write)?;
    f.write_all(&text).map_err(write)?;
    f.sync_all().map_err(write)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demand::{DemandEstimator, ThrottleMemory};

    fn consumer(key: &str) -> SavedConsumer {
        SavedConsumer {
            key: key.into(),
            estimator: DemandEstimator::default(),
            throttling: ThrottleMemory::default(),
            last_estimate: None,
            policy: None,
        }
    }

    #[test]
    fn saved_state_is_read_back_fresh_stale_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(load(&path, 1_000).unwrap(), Loaded::Absent);
        save(&path, vec![consumer("a"), consumer("b")], 1_000_000).unwrap();
        assert!(!dir.path().join("sub/state.json.tmp").exists());
        match load(&path, 1_003_000).unwrap() {
            Loaded::Fresh(c, age) => {
                assert_eq!(c, vec![consumer("a"), consumer("b")]);
                assert_eq!(age, Duration::from_secs(3));
            }
            other => panic!("{other:?}"),
        }
        let late = 1_000_000 + u64::try_from(MAX_AGE.as_millis()).unwrap() + 1;
        assert!(matches!(load(&path, late).unwrap(), Loaded::Stale(_)));
        assert_eq!(load(&path, 999_999).unwrap(), Loaded::Stale(Duration::ZERO));
        // Malformed, truncated or of another format: an error naming the file.
        for (text, want) in [
            ("not json", "is not a saved state"),
            ("{\"version\":1,\"savedAtUnixMs\":1", "is not a saved state"),
            ("{\"version\":2}", "state format 2"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = load(&path, 1_000_000).unwrap_err();
            assert!(e.to_string().contains(want), "{text}: {e}");
            assert!(e.to_string().contains("state.json"), "{e}");
        }
        // A directory where the file should be: reading fails, saving too.
        let d = dir.path().join("dir");
        std::fs::create_dir(&d).unwrap();
        assert!(load(&d, 0).is_err());
        assert!(save(&d, Vec::new(), 0).is_err());
    }
}
