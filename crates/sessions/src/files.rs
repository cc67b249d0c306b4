//! Writing uploaded files into a session's working directory, without ever
//! following a link.
//!
//! The working directory belongs to untrusted code, which may have planted a
//! symlink (`ln -s / data`) in an earlier call so that an upload to
//! `data/etc/passwd` lands outside. Every path here is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to a handle on
//! the working directory, so the kernel refuses any link and any escape
//! atomically, with no check-then-use race. Two passes: check everything,
//! then write; each file goes to a temporary name and is renamed into place,
//! so no half-written file is ever visible.

use kiln_protocol::ValidFile;
use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::path::Path;

/// Why the files of a request could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FileWriteError {
    /// The name collides with what is already in the working directory.
    #[error("files[{index}]: {name:?} {reason}; nothing was written")]
    Collision { index: usize, name: String, reason: &'static str },
    /// The filesystem refused the write.
    #[error("files[{index}]: could not write {name:?}: {source}")]
    Io { index: usize, name: String, source: std::io::Error },
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// Write `files` under `work`: all checked first, then written. New files
/// and folders are given to `owner` (the sandbox user's host uid), so the
/// session can change and delete what was uploaded.
pub fn write_files(work: &Path, files: &[ValidFile], owner: Option<u32>) -> Result<(), FileWriteError> {
    if files.is_empty() {
        return Ok(());
    }
    let io = |index: usize, name: &str| {
        let name = name.to_string();
        move |e: Errno| FileWriteError::Io { index, name, source: e.into() }
    };
    let root = rustix::fs::open(work, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(io(0, "."))?;

    // Pass 1: nothing on the way may be a link or a file, the target may
    // not be a folder or a link.
    for (index, f) in files.iter().enumerate() {
        let name = f.display_name();
        let collision = |reason| FileWriteError::Collision { index, name: name.clone(), reason };
        let (last, parents) = f.components.split_last().ok_or_else(|| collision("is empty"))?;
        let mut prefix = String::new();
        for c in parents {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            match open_beneath(&root, &prefix, OFlags::PATH | OFlags::DIRECTORY) {
                Ok(_) => {}
                Err(Errno::NOENT) => break, // created in pass 2
                Err(Errno::NOTDIR) => return Err(collision("needs a folder where a file exists")),
                Err(Errno::LOOP | Errno::XDEV) => {
                    return Err(collision("goes through a symbolic link, which uploads never follow"))
                }
                Err(e) => return Err(io(index, &name)(e)),
            }
        }
        let full = f.components.join("/");
        match open_beneath(&root, &full, OFlags::PATH | OFlags::NOFOLLOW) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(io(index, &name))?;
                let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
                if kind == rustix::fs::FileType::Directory {
                    return Err(collision("collides with an existing folder"));
                }
                if kind == rustix::fs::FileType::Symlink {
                    return Err(collision("is a symbolic link, which uploads never replace"));
                }
            }
            Err(Errno::NOENT) => {}
            Err(Errno::NOTDIR) => return Err(collision("needs a folder where a file exists")),
            Err(Errno::LOOP | Errno::XDEV) => {
                return Err(collision("goes through a symbolic link, which uploads never follow"))
            }
            Err(e) => return Err(io(index, &name)(e)),
        }
        let _ = last;
    }

    // Pass 2: create folders and write each file via a temporary name.
    for (index, f) in files.iter().enumerate() {
        let name = f.display_name();
        let err = io(index, &name);
        let Some((last, parents)) = f.components.split_last() else {
            continue;
        };
        let mut dir = rustix::io::dup(&root).map_err(io(index, &name))?;
        for c in parents {
            dir = match open_beneath(&dir, c, OFlags::PATH | OFlags::DIRECTORY) {
                Ok(d) => d,
                Err(Errno::NOENT) => {
                    let created = match rustix::fs::mkdirat(&dir, c.as_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) => true,
                        Err(Errno::EXIST) => false,
                        Err(e) => return Err(io(index, &name)(e)),
                    };
                    let d = open_beneath(&dir, c, OFlags::RDONLY | OFlags::DIRECTORY).map_err(io(index, &name))?;
                    // The session's, as its files are: its code (and the
                    // batch runner, which puts the work dir back) may
                    // write there.
                    if let (true, Some(uid)) = (created, owner) {
                        std::os::unix::fs::fchown(&d, Some(uid), Some(uid))
                            .map_err(|e| io(index, &name)(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
                    }
                    d
                }
                Err(e) => return Err(io(index, &name)(e)),
            };
        }
        let tmp = format!(".kiln-upload-{}", rand::random::<u64>());
        let fd = rustix::fs::openat2(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
            RESOLVE,
        )
        .map_err(io(index, &name))?;
        let mut written = write_all(&fd, &f.bytes);
        if let (Ok(()), Some(uid)) = (&written, owner) {
            written = std::os::unix::fs::fchown(&fd, Some(uid), Some(uid))
                .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO));
        }
        drop(fd);
        if let Err(e) = written.and_then(|()| rustix::fs::renameat(&dir, tmp.as_str(), &dir, last.as_str())) {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
            return Err(err(e));
        }
    }
    Ok(())
}

fn open_beneath(dir: &OwnedFd, path: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(dir, path, flags | OFlags::CLOEXEC, Mode::empty(), RESOLVE)
}

fn write_all(fd: &OwnedFd, mut bytes: &[u8]) -> Result<(), Errno> {
    while !bytes.is_empty() {
        let n = rustix::io::write(fd, bytes)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{decode_files, FileUpload};

    fn files(names: &[&str]) -> Vec<ValidFile> {
        let ups: Vec<FileUpload> = names
            .iter()
            .map(|n| FileUpload { name: (*n).into(), encoding: "string".into(), content: format!("<{n}>") })
            .collect();
        decode_files(&ups).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn files_land_in_sub_folders_created_on_the_way() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write_files(d.path(), &files(&["a.txt", "x/y/z.csv"]), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read_to_string(d.path().join("x/y/z.csv")).unwrap_or_default(), "<x/y/z.csv>");
        // Overwriting a file is fine.
        write_files(d.path(), &files(&["a.txt"]), None).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn folders_created_on_the_way_belong_to_the_session_user_like_its_files() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir(d.path().join("x")).unwrap_or(());
        write_files(d.path(), &files(&["x/y/z.csv"]), Some(4242)).unwrap_or_else(|e| panic!("{e}"));
        let uid = |p: &str| std::fs::symlink_metadata(d.path().join(p)).map(|m| m.uid()).unwrap_or(0);
        assert_eq!(uid("x/y"), 4242);
        assert_eq!(uid("x/y/z.csv"), 4242);
        assert_ne!(uid("x"), 4242, "a folder that was there keeps its owner");
    }

    #[test]
    fn a_planted_symlink_is_never_followed_and_nothing_is_written() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let outside = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap_or(());
        std::os::unix::fs::symlink(outside.path().join("f"), d.path().join("flink")).unwrap_or(());
        for name in ["link/evil.txt", "flink"] {
            let err = write_files(d.path(), &files(&["ok.txt", name]), None).err();
            assert!(matches!(err, Some(FileWriteError::Collision { index: 1, .. })), "{name}: {err:?}");
        }
        assert!(!d.path().join("ok.txt").exists(), "first file must not be written either");
        assert_eq!(std::fs::read_dir(outside.path()).map(|r| r.count()).unwrap_or(1), 0);
    }

    #[test]
    fn a_name_that_is_a_folder_or_under_a_file_collides() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir(d.path().join("dir")).unwrap_or(());
        std::fs::write(d.path().join("file"), "x").unwrap_or(());
        for name in ["dir", "file/sub.txt"] {
            let err = write_files(d.path(), &files(&[name]), None).err();
            assert!(matches!(err, Some(FileWriteError::Collision { .. })), "{name}: {err:?}");
        }
    }
}
