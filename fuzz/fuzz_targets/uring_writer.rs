//! The io_uring WAL writer's frame buffering: writes at arbitrary offsets, interleaved flushes,
//! then a synced flush; the file must equal the same writes applied to a Vec.
#![no_main]

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use denokv::store::wal_vfs::uring::UringWriter;
use libfuzzer_sys::{arbitrary, fuzz_target};

#[derive(Debug, arbitrary::Arbitrary)]
enum Op {
    Write { offset: u16, len: u16, byte: u8 },
    Flush,
}

thread_local! {
    /// One file on tmpfs (fdatasync costs nothing there), truncated for every input, and one
    /// writer on it: a new io_uring per input would be most of the time spent. Every input
    /// ends with a synced flush, which leaves the writer's buffer empty.
    static STATE: RefCell<(File, UringWriter)> = RefCell::new({
        let file = tempfile_on_shm();
        let fd: OwnedFd = file.try_clone().unwrap().into();
        (file, UringWriter::from_fd(fd).expect("io_uring is available"))
    });
}

fn tempfile_on_shm() -> File {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let path = format!("{dir}/denokv-fuzz-uring-{}", std::process::id());
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

fuzz_target!(|ops: Vec<Op>| {
    STATE.with_borrow_mut(|(file, w)| {
        file.set_len(0).unwrap();
        let mut model = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Write { offset, len, byte } => {
                    // Offsets up to 64 KiB, lengths up to a WAL frame (24-byte header and a
                    // 4 KiB page) and a byte: SQLite writes whole frames, but the writer must
                    // take any write.
                    let offset = u64::from(offset);
                    let len = usize::from(len % (24 + 4096 + 2));
                    // Vary the bytes so a misplaced copy shows.
                    let bytes: Vec<u8> =
                        (0..len).map(|j| byte.wrapping_add((i + j) as u8)).collect();
                    w.write(&bytes, offset).unwrap();
                    // pwrite semantics: an empty write changes nothing, not even the length.
                    if len > 0 {
                        let end = offset as usize + len;
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[offset as usize..end].copy_from_slice(&bytes);
                    }
                }
                Op::Flush => {
                    if w.flush(false).is_err() {
                        panic!("flush failed");
                    }
                }
            }
        }
        if w.flush(true).is_err() {
            panic!("synced flush failed");
        }
        let mut got = vec![0; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut got, 0).unwrap();
        assert!(
            got == model,
            "file ({} bytes) differs from the model ({} bytes)",
            got.len(),
            model.len()
        );
    });
});
