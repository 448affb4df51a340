//! Errno values as the names scenarios print (`EINVAL`, `EEXIST`, ...).

/// The symbolic name of a Linux errno, or `errno N` for one this table does not know.
pub fn name(errno: i32) -> String {
    let s = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTTY => "ENOTTY",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EHWPOISON => "EHWPOISON",
        n => return format!("errno {n}"),
    };
    s.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::name(libc::EINVAL), "EINVAL");
        assert_eq!(super::name(libc::EEXIST), "EEXIST");
        assert_eq!(super::name(libc::ENOMEM), "ENOMEM");
        assert_eq!(super::name(4095), "errno 4095");
    }
}
