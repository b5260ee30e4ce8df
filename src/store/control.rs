//! The control file, `data_dir/control`: the daemon's durable settings that are not tasks (paused queues,
//! limits, periodic schedules). They change rarely and are small, so the file is written whole at each change
//! (a temporary file, synced, renamed over the old one, the directory synced): a crash leaves the old file or
//! the new one, never a mix. It is MessagePack with field names, so a field added later reads as its default.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::disk::{io_error, sync_dir};
use super::StoreError;

/// The file's name in the data directory.
pub const FILE: &str = "control";

/// A rate and concurrency limit on a task name or a queue (proto.md, `set_limit`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limit {
    /// At most this many starts per second, minute or hour (`"100/m"`), for every worker together.
    pub rate: Option<String>,
    /// At most this many running (leased) at once, for every worker together.
    pub concurrency: Option<u32>,
}

/// Everything the file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Control {
    pub paused: BTreeSet<String>,
    pub task_limits: BTreeMap<String, Limit>,
    pub queue_limits: BTreeMap<String, Limit>,
    pub schedules: BTreeMap<String, super::schedule::Schedule>,
}

impl Control {
    /// Reads the file in `dir`; no file is an empty control.
    pub fn load(dir: &Path) -> Result<Control, StoreError> {
        let path = dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => rmp_serde::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                id: path.display().to_string(),
                message: format!("the control file does not decode: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Control::default()),
            Err(e) => Err(io_error("cannot read", &path, e)),
        }
    }

    /// Applies `change` to a copy, saves the copy in `dir`, and only then takes it: a change the disk refused
    /// changes nothing.
    pub fn update(&mut self, dir: &Path, change: impl FnOnce(&mut Control)) -> Result<(), StoreError> {
        let mut changed = self.clone();
        change(&mut changed);
        changed.save(dir)?;
        *self = changed;
        Ok(())
    }

    /// Replaces the file in `dir` with this control, durably.
    fn save(&self, dir: &Path) -> Result<(), StoreError> {
        let bytes = rmp_serde::to_vec_named(self)
            .map_err(|e| StoreError::Corrupt { id: FILE.into(), message: format!("cannot encode: {e}") })?;
        let path = dir.join(FILE);
        let temporary = dir.join(format!("{FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_data()
        };
        write().map_err(|e| io_error("cannot write", &temporary, e))?;
        std::fs::rename(&temporary, &path).map_err(|e| io_error("cannot rename", &temporary, e))?;
        sync_dir(dir)
    }
}
