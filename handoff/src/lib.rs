//! The handoff of a running guest from an old VMM process to a new one, as one typed state
//! machine with a one-way commit point ([`machine`]), the record that makes it survive the
//! arbiter's death ([`HandoffRecord`], [`Journal`]), and the arbiter that drives it between two
//! `cpr-vmm` processes ([`cpr_vmm`]).
//!
//! Every arbiter drives the same machine: cprd for both backends, `cpr-vmm handoff` without
//! cprd, and cprd's crash recovery. KVM-free: nothing here opens `/dev/kvm`.

pub mod cpr_vmm;
pub mod machine;
pub mod process;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use machine::{Action, Event, Phase, Sides, run, step};

/// One VMM process taking part in a handoff.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmRef {
    /// Its process id (0 while not started).
    pub pid: u32,
    /// Its control socket (cpr-vmm) or QMP socket (QEMU).
    pub control: PathBuf,
}

/// What an arbiter persists about one handoff in flight: enough for a restarted arbiter to
/// finish it forward or roll it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffRecord {
    /// The VM.
    pub vm: String,
    /// Where the handoff stands.
    pub phase: Phase,
    /// The guest's generation in the old VMM (the new one runs `from_generation + 1`).
    pub from_generation: u64,
    /// The VMM that ran the guest when the handoff began.
    pub old: VmmRef,
    /// The VMM the guest is handed to.
    pub new: VmmRef,
    /// The new VMM's binary.
    pub binary: PathBuf,
}

/// Where handoff records are kept.
pub trait Journal {
    /// Writes `record` so that it survives the writer's death: all of it or nothing.
    fn write(&mut self, record: &HandoffRecord) -> Result<(), String>;
}

/// No journal: an arbiter that cannot be restarted mid-handoff (the standalone
/// `cpr-vmm handoff`, whose death closes the new VMM's commit channel, so that the new VMM
/// exits without running the guest).
#[derive(Debug, Default)]
pub struct NoJournal;

impl Journal for NoJournal {
    fn write(&mut self, _record: &HandoffRecord) -> Result<(), String> {
        Ok(())
    }
}

/// Size every record is padded to (with spaces, which JSON ignores), so that a record can be
/// replaced in place by one `pwrite`.
const RECORD_BYTES: usize = 4096;

/// A journal of one file per VM. The first record goes in atomically (written beside the file,
/// then renamed); later ones replace it in place with a single `pwrite` of a fixed-size,
/// space-padded record at offset 0: one system call, no directory change, which keeps the write
/// of the decision (inside the guest's downtime) cheap. A `pwrite` of one page to a file in
/// `/run` (tmpfs) is never torn by the writer's death: the kernel completes the copy before a
/// signal takes effect. A record that does not fit in the padding is written beside the file and
/// renamed, as the first one.
#[derive(Debug)]
pub struct FileJournal {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl FileJournal {
    /// The journal file of VM `vm` in directory `dir`.
    pub fn new(dir: &Path, vm: &str) -> Self {
        Self { path: dir.join(format!("{vm}.handoff")), file: None }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the record of a handoff in flight, if there is one. A file that exists but does not
    /// parse is an error: recovery must not guess.
    pub fn read(&self) -> Result<Option<HandoffRecord>, String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("handoff record {} does not parse: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read handoff record {}: {e}", self.path.display())),
        }
    }

    /// Removes the record once the handoff has ended and its outcome is recorded elsewhere.
    pub fn remove(&mut self) {
        self.file = None;
        let _ = std::fs::remove_file(&self.path);
    }

    /// Writes `bytes` beside the file and renames it into place; keeps it open for later records.
    fn replace(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.path.with_extension("handoff-tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = Some(f);
        Ok(())
    }
}

impl Journal for FileJournal {
    fn write(&mut self, record: &HandoffRecord) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let mut bytes = serde_json::to_vec(record).map_err(|e| format!("cannot encode the handoff record: {e}"))?;
        let written = if bytes.len() <= RECORD_BYTES {
            bytes.resize(RECORD_BYTES, b' ');
            match &self.file {
                // Only over a record of the same, padded size.
                Some(f) if f.metadata().is_ok_and(|m| m.len() == RECORD_BYTES as u64) => f.write_all_at(&bytes, 0),
                _ => self.replace(&bytes),
            }
        } else {
            self.replace(&bytes)
        };
        written.map_err(|e| format!("cannot write handoff record {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests;
