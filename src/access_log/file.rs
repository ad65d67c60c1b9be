//! An access-log file that follows log rotation: it is opened again when the file at its path
//! is no longer the one it writes to (logrotate renamed or removed it), checked at most once a
//! second, and after `SIGUSR1` or the admin's `POST /reopen_logs` (as Envoy's) before the next
//! line or within a second. Only between lines: a line is never split across two files. A file
//! that cannot be opened again leaves the old one in use: no line is lost.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bumped to have every access-log file opened again before its next write.
static REOPEN: AtomicU64 = AtomicU64::new(0);

/// How often a file checks that its path still leads to it; writers with nothing to write
/// flush this often, so that a rotated file is let go of without waiting for a line.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Has every access-log file opened again by its path before its next write.
pub fn reopen_files() {
    REOPEN.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    /// The file's device and inode, to tell it from a new file at the same path.
    identity: (u64, u64),
    generation: u64,
    checked: Instant,
    /// The last write ended a line (or a flush came since): the next write begins one.
    between_lines: bool,
}

impl LogFile {
    pub fn open(path: PathBuf) -> io::Result<Self> {
        let generation = REOPEN.load(Ordering::Relaxed);
        let (file, identity) = open(&path)?;
        Ok(Self { path, file, identity, generation, checked: Instant::now(), between_lines: true })
    }

    /// Opens the path again when asked to, or when it no longer leads to this file.
    fn follow_rotation(&mut self) {
        let generation = REOPEN.load(Ordering::Relaxed);
        let asked = generation != self.generation;
        if !asked && self.checked.elapsed() < CHECK_EVERY {
            return;
        }
        self.generation = generation;
        self.checked = Instant::now();
        let moved = match std::fs::metadata(&self.path) {
            Ok(meta) => (meta.dev(), meta.ino()) != self.identity,
            Err(_) => true,
        };
        if !asked && !moved {
            return;
        }
        match open(&self.path) {
            Ok((file, identity)) => {
                tracing::info!(path = %self.path.display(), "access log file opened again");
                (self.file, self.identity) = (file, identity);
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot open the access log file again; writing on to the old one");
            }
        }
    }
}

fn open(path: &std::path::Path) -> io::Result<(File, (u64, u64))> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let meta = file.metadata()?;
    Ok((file, (meta.dev(), meta.ino())))
}

/// The writers flush after each batch of whole lines: a file is only opened again on a flush,
/// or on a write that begins a line (after a flush, or after a write that ended one), never in
/// the middle of a line (a `BufWriter` in front writes out whenever it fills).
impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.between_lines {
            self.follow_rotation();
        }
        let written = self.file.write(buf)?;
        if written > 0 {
            self.between_lines = buf[..written].ends_with(b"\n");
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.between_lines = true;
        self.follow_rotation();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_file_is_followed_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let rotated = dir.path().join("access.log.1");
        let mut log = LogFile::open(path.clone()).unwrap();
        log.write_all(b"one\n").unwrap();
        log.flush().unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        // Asked at once (SIGUSR1, /reopen_logs) rather than waiting for the next check.
        reopen_files();
        log.write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "one\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");

        // Unasked, a second after the last check: the path is checked again.
        log.flush().unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        log.checked -= CHECK_EVERY;
        log.write_all(b"three\n").unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "two\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }

    #[test]
    fn a_line_is_never_split_across_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let rotated = dir.path().join("access.log.1");
        let mut log = LogFile::open(path.clone()).unwrap();
        log.write_all(b"the start ").unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        reopen_files();
        log.write_all(b"and the end\n").unwrap();
        log.flush().unwrap(); // the line is whole: now the file is opened again
        log.write_all(b"next\n").unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "the start and the end\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "next\n");
    }

    #[test]
    fn a_file_that_cannot_be_opened_again_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("logs");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("access.log");
        let mut log = LogFile::open(path.clone()).unwrap();
        let moved = dir.path().join("moved");
        std::fs::rename(&sub, &moved).unwrap();
        reopen_files();
        log.flush().unwrap();
        log.write_all(b"kept\n").unwrap();
        assert_eq!(std::fs::read_to_string(moved.join("access.log")).unwrap(), "kept\n");
    }
}
