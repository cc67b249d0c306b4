//! Which Python programs need no package beyond the standard library, as
//! far as their import statements say: a batch item that is such a program
//! runs in one of the batch's lanes, whose tests fork from a lean process
//! without the runtime's packages (`lanes`); one that imports a package
//! runs in a session of its own, whose tests fork from a kernel that has
//! the runtime's packages imported already. The verdict only decides which
//! is faster: a program classed wrongly still runs correctly either way
//! (an import this misses is made by the test itself, a module it does not
//! know costs a session).
//!
//! The table is Python 3.11's `sys.stdlib_module_names` (the runtime's
//! interpreter), without the private `_` modules, which all count as the
//! standard library's.

/// Python's standard library modules, sorted.
const STDLIB: &[&str] = &[
    "abc",
    "aifc",
    "antigravity",
    "argparse",
    "array",
    "ast",
    "asynchat",
    "asyncio",
    "asyncore",
    "atexit",
    "audioop",
    "base64",
    "bdb",
    "binascii",
    "bisect",
    "builtins",
    "bz2",
    "cProfile",
    "calendar",
    "cgi",
    "cgitb",
    "chunk",
    "cmath",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "colorsys",
    "compileall",
    "concurrent",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "copyreg",
    "crypt",
    "csv",
    "ctypes",
    "curses",
    "dataclasses",
    "datetime",
    "dbm",
    "decimal",
    "difflib",
    "dis",
    "distutils",
    "doctest",
    "email",
    "encodings",
    "ensurepip",
    "enum",
    "errno",
    "faulthandler",
    "fcntl",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "genericpath",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "grp",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "idlelib",
    "imaplib",
    "imghdr",
    "imp",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "lib2to3",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "mailcap",
    "marshal",
    "math",
    "mimetypes",
    "mmap",
    "modulefinder",
    "msilib",
    "msvcrt",
    "multiprocessing",
    "netrc",
    "nis",
    "nntplib",
    "nt",
    "ntpath",
    "nturl2path",
    "numbers",
    "opcode",
    "operator",
    "optparse",
    "os",
    "ossaudiodev",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pipes",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "posix",
    "posixpath",
    "pprint",
    "profile",
    "pstats",
    "pty",
    "pwd",
    "py_compile",
    "pyclbr",
    "pydoc",
    "pydoc_data",
    "pyexpat",
    "queue",
    "quopri",
    "random",
    "re",
    "readline",
    "reprlib",
    "resource",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "select",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "site",
    "smtpd",
    "smtplib",
    "sndhdr",
    "socket",
    "socketserver",
    "spwd",
    "sqlite3",
    "sre_compile",
    "sre_constants",
    "sre_parse",
    "ssl",
    "stat",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "sunau",
    "symtable",
    "sys",
    "sysconfig",
    "syslog",
    "tabnanny",
    "tarfile",
    "telnetlib",
    "tempfile",
    "termios",
    "textwrap",
    "this",
    "threading",
    "time",
    "timeit",
    "tkinter",
    "token",
    "tokenize",
    "tomllib",
    "trace",
    "traceback",
    "tracemalloc",
    "tty",
    "turtle",
    "turtledemo",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "urllib",
    "uu",
    "uuid",
    "venv",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "winreg",
    "winsound",
    "wsgiref",
    "xdrlib",
    "xml",
    "xmlrpc",
    "zipapp",
    "zipfile",
    "zipimport",
    "zlib",
    "zoneinfo",
];

/// Whether every module `code` imports by statement (`import a.b`, `from a
/// import b`, on any line, in any block) is in the standard library.
pub(crate) fn imports_only_stdlib(code: &str) -> bool {
    code.lines().flat_map(|line| line.split(';')).all(|statement| {
        let statement = statement.trim();
        let modules: Vec<&str> = if let Some(rest) = statement.strip_prefix("import ") {
            rest.split(',').filter_map(|m| m.split_whitespace().next()).collect()
        } else if let Some(rest) = statement.strip_prefix("from ") {
            rest.split_whitespace().next().into_iter().collect()
        } else {
            return true;
        };
        modules.iter().all(|m| {
            let top = m.split('.').next().unwrap_or_default();
            !m.starts_with('.') && (top.starts_with('_') || STDLIB.binary_search(&top).is_ok())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_for_its_binary_search() {
        assert!(STDLIB.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn programs_importing_only_the_standard_library_are_told_from_those_that_import_packages() {
        for code in [
            "print(1)",
            "import sys, math\nfrom collections import deque",
            "import os.path as p; from itertools import (\n    chain,\n)",
            "def f():\n    import heapq\n    from __future__ import annotations",
            "x = 'import'  # from here",
        ] {
            assert!(imports_only_stdlib(code), "{code}");
        }
        for code in [
            "import numpy as np",
            "import sys, pandas",
            "from scipy.optimize import minimize",
            "from . import sibling",
            "def f():\n    import helper",
            "import math; import requests",
        ] {
            assert!(!imports_only_stdlib(code), "{code}");
        }
    }
}
