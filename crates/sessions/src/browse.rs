//! Reading a session's working directory from the host (listing and
//! download), with the same rule as uploads: resolved beneath the working
//! directory only, never through a symbolic link, so a link planted by the
//! session's code cannot make the server read anything outside.

use kiln_protocol::{FileEntry, FileList};
use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::path::Path;

/// Why a path could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    /// Nothing there.
    #[error("{0:?} does not exist in the session's working directory")]
    NotFound(String),
    /// A symbolic link on the way (never followed).
    #[error("{0:?} goes through a symbolic link, which the file endpoints never follow")]
    Symlink(String),
    /// A file where a directory was expected, or the reverse.
    #[error("{0:?} {1}")]
    WrongKind(String, &'static str),
    /// Larger than the download limit.
    #[error("{0:?} is {1} bytes, more than the download limit of {2} bytes")]
    TooLarge(String, u64, u64),
    /// Any other filesystem error.
    #[error("could not read {0:?}: {1}")]
    Io(String, std::io::Error),
}

/// Why a socket or FIFO the session made cannot be downloaded.
const NOT_REGULAR: &str = "is not a regular file (a socket or a FIFO) and cannot be downloaded";

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

fn open(work: &Path, components: &[String], flags: OFlags) -> Result<OwnedFd, BrowseError> {
    let shown = components.join("/");
    let root = rustix::fs::open(work, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| BrowseError::Io(".".into(), e.into()))?;
    if components.is_empty() {
        return rustix::fs::openat(&root, ".", flags | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| BrowseError::Io(".".into(), e.into()));
    }
    rustix::fs::openat2(&root, shown.as_str(), flags | OFlags::CLOEXEC, Mode::empty(), RESOLVE).map_err(|e| match e {
        Errno::NOENT => BrowseError::NotFound(shown.clone()),
        Errno::LOOP | Errno::XDEV => BrowseError::Symlink(shown.clone()),
        Errno::NOTDIR => BrowseError::WrongKind(shown.clone(), "is not a directory"),
        Errno::ISDIR => BrowseError::WrongKind(shown.clone(), "is a directory: list it instead"),
        // What opening a socket for reading answers.
        Errno::NXIO => BrowseError::WrongKind(shown.clone(), NOT_REGULAR),
        e => BrowseError::Io(shown.clone(), e.into()),
    })
}

/// List the directory at `components` below `work`.
pub fn list_dir(work: &Path, components: &[String]) -> Result<FileList, BrowseError> {
    let shown = components.join("/");
    let dir = open(work, components, OFlags::RDONLY | OFlags::DIRECTORY)?;
    let mut entries = Vec::new();
    let iter = rustix::fs::Dir::read_from(&dir).map_err(|e| BrowseError::Io(shown.clone(), e.into()))?;
    for entry in iter {
        let entry = entry.map_err(|e| BrowseError::Io(shown.clone(), e.into()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let st = rustix::fs::statat(&dir, entry.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
        let (kind, size) = match st {
            Ok(st) => match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                rustix::fs::FileType::RegularFile => ("file", st.st_size as u64),
                rustix::fs::FileType::Directory => ("directory", 0),
                rustix::fs::FileType::Symlink => ("symlink", 0),
                _ => ("other", 0),
            },
            Err(_) => ("other", 0),
        };
        let path = if shown.is_empty() { name.clone() } else { format!("{shown}/{name}") };
        entries.push(FileEntry { name, path, r#type: kind.into(), size });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(FileList { path: shown, entries })
}

/// Read the file at `components` below `work`, up to `max` bytes.
pub fn read_file(work: &Path, components: &[String], max: u64) -> Result<Vec<u8>, BrowseError> {
    let shown = components.join("/");
    if components.is_empty() {
        return Err(BrowseError::WrongKind(shown, "is a directory: list it instead"));
    }
    // Non-blocking: opening a FIFO for reading would otherwise wait for a
    // writer that the session may never provide, holding a server thread.
    let fd = open(work, components, OFlags::RDONLY | OFlags::NONBLOCK)?;
    let st = rustix::fs::fstat(&fd).map_err(|e| BrowseError::Io(shown.clone(), e.into()))?;
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::RegularFile => {}
        rustix::fs::FileType::Directory => {
            return Err(BrowseError::WrongKind(shown, "is a directory: list it instead"));
        }
        _ => return Err(BrowseError::WrongKind(shown, NOT_REGULAR)),
    }
    let size = st.st_size as u64;
    if size > max {
        return Err(BrowseError::TooLarge(shown, size, max));
    }
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::with_capacity(size as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, max + 1), &mut bytes)
        .map_err(|e| BrowseError::Io(shown.clone(), e))?;
    if bytes.len() as u64 > max {
        return Err(BrowseError::TooLarge(shown, bytes.len() as u64, max));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_and_reading_stay_beneath_the_directory_and_refuse_links() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir(d.path().join("sub")).unwrap_or(());
        std::fs::write(d.path().join("sub/a.txt"), "hello").unwrap_or(());
        std::os::unix::fs::symlink("/etc", d.path().join("escape")).unwrap_or(());
        let listing = list_dir(d.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<_> = listing.entries.iter().map(|e| (e.name.as_str(), e.r#type.as_str())).collect();
        assert_eq!(kinds, vec![("escape", "symlink"), ("sub", "directory")]);
        let sub = vec!["sub".to_string()];
        assert_eq!(list_dir(d.path(), &sub).map(|l| l.entries[0].size).unwrap_or(0), 5);
        assert_eq!(read_file(d.path(), &["sub".into(), "a.txt".into()], 100).unwrap_or_default(), b"hello");
        for path in [vec!["escape".to_string()], vec!["escape".to_string(), "passwd".to_string()]] {
            assert!(matches!(read_file(d.path(), &path, 1 << 20), Err(BrowseError::Symlink(_))), "{path:?}");
        }
        assert!(matches!(read_file(d.path(), &["nope".into()], 10), Err(BrowseError::NotFound(_))));
        assert!(matches!(read_file(d.path(), &["sub".into()], 10), Err(BrowseError::WrongKind(..))));
        assert!(matches!(read_file(d.path(), &["sub".into(), "a.txt".into()], 2), Err(BrowseError::TooLarge(..))));
    }

    #[test]
    fn a_socket_or_a_fifo_is_refused_as_not_a_file_without_waiting_for_a_writer() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let _socket = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap_or_else(|e| panic!("{e}"));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::RUSR | Mode::WUSR,
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for name in ["sock", "fifo"] {
            let got = read_file(d.path(), &[name.to_string()], 1 << 20);
            assert!(matches!(&got, Err(BrowseError::WrongKind(_, why)) if *why == NOT_REGULAR), "{name}: {got:?}");
        }
        let kinds: Vec<_> = list_dir(d.path(), &[]).map(|l| l.entries).unwrap_or_default();
        assert!(kinds.iter().all(|e| e.r#type == "other"), "{kinds:?}");
    }
}
