//! The io_uring flavour's writer: keeps a transaction's WAL writes in one buffer (SQLite
//! appends frames) and submits them with the commit's `fdatasync` as one linked io_uring
//! submission. Pure file I/O, no SQLite: its error paths are tested here on files that fail.

use std::ffi::{c_int, c_void, CStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::{opcode, squeue, types, IoUring};
use rusqlite::ffi;

/// Buffered WAL bytes past which they are written out before the commit (a huge transaction).
const MAX_BUFFERED: usize = 32 << 20;

/// The io_uring flavour's state for one open WAL.
pub struct UringWriter {
    ring: IoUring,
    /// Our own descriptor on the WAL: the default VFS's is private to it.
    fd: OwnedFd,
    /// Buffered bytes and the file offset of the first.
    start: u64,
    buf: Vec<u8>,
    /// The first sync goes through the default VFS, which also syncs the directory the
    /// first time a new WAL file is synced.
    pub synced_once: bool,
}

impl UringWriter {
    /// Opens its own descriptor on the file at `path`.
    pub fn open(path: &CStr) -> std::io::Result<UringWriter> {
        // SAFETY: a plain open(2) of a NUL-terminated path; the descriptor is owned below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::from_fd(fd)
    }

    /// Writes through `fd`.
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<UringWriter> {
        Ok(UringWriter {
            ring: IoUring::new(4)?,
            fd,
            start: 0,
            buf: Vec::new(),
            synced_once: false,
        })
    }

    /// Buffers `bytes` for `offset`: appended when they continue (or overwrite) the buffer;
    /// otherwise the buffer is written out first.
    pub fn write(&mut self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        let end = self.start + self.buf.len() as u64;
        if !self.buf.is_empty() && (offset < self.start || offset > end) {
            self.flush(false)?;
        }
        if self.buf.is_empty() {
            self.start = offset;
        }
        let at = (offset - self.start) as usize;
        let overlap = (self.buf.len() - at).min(bytes.len());
        self.buf[at..at + overlap].copy_from_slice(&bytes[..overlap]);
        self.buf.extend_from_slice(&bytes[overlap..]);
        if self.buf.len() > MAX_BUFFERED {
            self.flush(false)?;
        }
        Ok(())
    }

    /// Writes the buffer out and, if `sync`, fdatasyncs the file after it: one submission,
    /// the sync linked behind the write so it runs only once the write succeeded.
    pub fn flush(&mut self, sync: bool) -> Result<(), FlushError> {
        let fd = types::Fd(self.fd.as_raw_fd());
        let mut entries = Vec::with_capacity(2);
        if !self.buf.is_empty() {
            let write = opcode::Write::new(fd, self.buf.as_ptr(), self.buf.len() as u32)
                .offset(self.start)
                .build()
                .user_data(WRITE);
            entries.push(if sync {
                write.flags(squeue::Flags::IO_LINK)
            } else {
                write
            });
        }
        if sync {
            let fsync = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC);
            entries.push(fsync.build().user_data(SYNC));
        }
        if entries.is_empty() {
            return Ok(());
        }
        let result = self.submit(&entries);
        // Whatever happened, these bytes are SQLite's to write again: it rolls back on error.
        let written = std::mem::take(&mut self.buf);
        let (write, fsync) = result.map_err(FlushError::Write)?;
        if let Some(n) = write {
            if n < 0 {
                return Err(FlushError::Write(std::io::Error::from_raw_os_error(-n)));
            }
            if (n as usize) < written.len() {
                // A short write (rare: a signal, a full disk): finish it the plain way, then
                // sync the plain way too, since the linked sync was cancelled.
                write_all_at(&self.fd, &written[n as usize..], self.start + n as u64)
                    .map_err(FlushError::Write)?;
                if sync {
                    // SAFETY: fdatasync on a descriptor we own.
                    if unsafe { libc::fdatasync(self.fd.as_raw_fd()) } != 0 {
                        return Err(FlushError::Sync(std::io::Error::last_os_error()));
                    }
                }
                return Ok(());
            }
        }
        if let Some(n) = fsync {
            if n < 0 {
                return Err(FlushError::Sync(std::io::Error::from_raw_os_error(-n)));
            }
        }
        Ok(())
    }

    /// Submits `entries` and waits for all of them: (write result, sync result).
    fn submit(&mut self, entries: &[squeue::Entry]) -> std::io::Result<(Option<i32>, Option<i32>)> {
        {
            let mut sq = self.ring.submission();
            for entry in entries {
                // SAFETY: the buffer and descriptor outlive the submission: we wait for every
                // completion below before returning, and the ring has room for both entries.
                unsafe { sq.push(entry) }.map_err(|_| std::io::Error::other("ring full"))?;
            }
        }
        let (mut write, mut sync) = (None, None);
        let mut left = entries.len();
        while left > 0 {
            match self.ring.submit_and_wait(left) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                match cqe.user_data() {
                    WRITE => write = Some(cqe.result()),
                    _ => {
                        #[cfg(test)]
                        if cqe.result() >= 0 {
                            SYNCS.with(|n| n.set(n.get() + 1));
                        }
                        sync = Some(cqe.result());
                    }
                }
                left -= 1;
            }
        }
        Ok((write, sync))
    }
}

const WRITE: u64 = 1;
const SYNC: u64 = 2;

#[cfg(test)]
thread_local! {
    /// The fdatasyncs that io_uring completed for this thread's writers: tests prove with it
    /// that a commit's submission carries its sync.
    static SYNCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many io_uring fdatasyncs have succeeded on the calling thread.
#[cfg(test)]
pub fn syncs_on_this_thread() -> u64 {
    SYNCS.with(|n| n.get())
}

pub enum FlushError {
    Write(std::io::Error),
    Sync(std::io::Error),
}

impl From<FlushError> for std::io::Error {
    fn from(e: FlushError) -> Self {
        match e {
            FlushError::Write(e) | FlushError::Sync(e) => e,
        }
    }
}

impl FlushError {
    /// The SQLite result code for this failure.
    pub fn code(&self) -> c_int {
        match self {
            FlushError::Write(e) if e.raw_os_error() == Some(libc::ENOSPC) => ffi::SQLITE_FULL,
            FlushError::Write(_) => ffi::SQLITE_IOERR_WRITE,
            FlushError::Sync(_) => ffi::SQLITE_IOERR_FSYNC,
        }
    }
}

fn write_all_at(fd: &OwnedFd, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: pwrite from a live slice on a descriptor we own.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                bytes.as_ptr() as *const c_void,
                bytes.len(),
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;

    fn open(path: &str, flags: c_int) -> OwnedFd {
        let path = std::ffi::CString::new(path).unwrap();
        // SAFETY: open(2) of a NUL-terminated path; the descriptor is owned at once.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: just opened, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn writer(fd: OwnedFd) -> UringWriter {
        UringWriter::from_fd(fd).expect("these tests need io_uring")
    }

    #[test]
    fn buffered_writes_land_at_their_offsets_with_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        std::fs::write(&path, b"").unwrap();
        let mut w = writer(open(path.to_str().unwrap(), libc::O_WRONLY));
        w.write(b"hello", 0).unwrap();
        w.write(b" world", 5).unwrap();
        // Overwrites inside the buffer, then a write elsewhere, which flushes the buffer.
        w.write(b"W", 6).unwrap();
        w.write(b"!", 100).unwrap();
        assert!(w.flush(true).is_ok());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..11], b"hello World");
        assert_eq!(bytes[100], b'!');
        assert_eq!(bytes.len(), 101);
    }

    #[test]
    fn a_flush_with_sync_submits_the_write_and_an_fdatasync_that_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        std::fs::write(&path, b"").unwrap();
        let mut w = writer(open(path.to_str().unwrap(), libc::O_WRONLY));
        let before = syncs_on_this_thread();
        w.write(b"frame", 0).unwrap();
        assert!(w.flush(false).is_ok());
        assert_eq!(
            syncs_on_this_thread(),
            before,
            "no sync asked for, none made"
        );
        w.write(b"frame", 5).unwrap();
        assert!(w.flush(true).is_ok());
        assert_eq!(syncs_on_this_thread(), before + 1, "the commit's fdatasync");
        assert_eq!(std::fs::read(&path).unwrap(), b"frameframe");
    }

    #[test]
    fn the_sync_rides_in_the_same_submission_as_the_write() {
        // A pipe takes the write and fails the fdatasync (EINVAL): a flush that wrote and
        // did not sync would succeed.
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut w = writer(write);
        w.write(b"frame", 0).unwrap();
        match w.flush(true) {
            Err(e @ FlushError::Sync(_)) => assert_eq!(e.code(), ffi::SQLITE_IOERR_FSYNC),
            Err(FlushError::Write(e)) => panic!("the write to a pipe failed: {e}"),
            Ok(()) => panic!("a flush with sync did not sync"),
        }
        let mut got = [0u8; 5];
        // SAFETY: read(2) into a live five-byte buffer from a descriptor we own.
        let n = unsafe { libc::read(read.as_raw_fd(), got.as_mut_ptr() as *mut c_void, 5) };
        assert_eq!(n, 5);
        assert_eq!(&got, b"frame", "the write ran before the sync");
    }

    #[test]
    fn a_full_disk_is_a_write_failure_and_the_linked_sync_does_not_run() {
        // /dev/full answers every write with ENOSPC.
        let mut w = writer(open("/dev/full", libc::O_WRONLY));
        w.write(&[7u8; 4096], 0).unwrap();
        match w.flush(true) {
            Err(e @ FlushError::Write(_)) => {
                assert_eq!(e.code(), ffi::SQLITE_FULL);
                assert_eq!(std::io::Error::from(e).raw_os_error(), Some(libc::ENOSPC));
            }
            Err(FlushError::Sync(e)) => panic!("reported as a sync failure: {e}"),
            Ok(()) => panic!("a write to /dev/full succeeded"),
        }
        // The failed bytes are dropped: SQLite rolls back and writes again.
        assert!(w.flush(false).is_ok());
    }

    #[test]
    fn other_write_errors_are_io_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        std::fs::write(&path, b"").unwrap();
        // Read-only descriptor: EBADF on write.
        let mut w = writer(open(path.to_str().unwrap(), libc::O_RDONLY));
        w.write(b"frame", 0).unwrap();
        let e = w
            .flush(true)
            .expect_err("writing a read-only descriptor fails");
        assert!(matches!(e, FlushError::Write(_)));
        assert_eq!(e.code(), ffi::SQLITE_IOERR_WRITE);
    }

    #[test]
    fn a_failed_sync_is_a_sync_failure() {
        // fdatasync on a pipe fails with EINVAL.
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned here.
        let (_read, write) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut w = writer(write);
        let e = w.flush(true).expect_err("syncing a pipe fails");
        assert!(matches!(e, FlushError::Sync(_)));
        assert_eq!(e.code(), ffi::SQLITE_IOERR_FSYNC);
    }
}
