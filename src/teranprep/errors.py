"""The one exception type that reaches the user as a single line: what is wrong, where, and the fix."""


class PrepError(Exception):
    """A fatal, user-fixable problem. The CLI prints `error: <message>` and exits with code 2."""


class ItemError(Exception):
    """A per-item problem (one image, one caption row): recorded and skipped by the stage."""


# File-system failures that retrying cannot fix: the user's disk, mount or permissions.
USER_FS_ERRNOS = frozenset({28, 30, 13, 1, 122})  # ENOSPC, EROFS, EACCES, EPERM, EDQUOT


def os_error_line(exc: OSError) -> str:
    import errno
    where = exc.filename or "a file"
    hint = {errno.ENOSPC: "free some space (completed work was kept) and run the command again",
            errno.EROFS: "the file system is read-only; choose a writable output folder",
            errno.EACCES: "permission denied; choose a folder you can write to",
            errno.EPERM: "permission denied; choose a folder you can write to",
            errno.ENOTDIR: "a part of this path is a file, not a folder",
            errno.EEXIST: "a file already stands there",
            errno.EISDIR: "a folder stands where a file is needed",
            errno.ENOENT: "no such file or folder"}.get(exc.errno, "check the path")
    return f"{where}: {exc.strerror or exc}; {hint}"
