//! Where a task's process runs and what it can reach (ADR 0010,
//! invariant 11).
//!
//! * The wrapper is non-dumpable ([`harden_self`]): a process of the same
//!   user cannot read its memory or environment through `/proc`.
//! * Run as root, the wrapper gives every running task a **uid (and gid) of
//!   its own** from `--udf-uids`, no supplementary groups. Distinct uids are
//!   what keep tasks from each other: two tasks under one shared account
//!   (`nobody`) could read each other's `/proc/<pid>/environ` and files.
//!   A uid is held with an exclusive `flock` on `<lock dir>/<uid>`, so
//!   several wrappers on one machine never share one; they are taken in
//!   rotation through the range, and every process still running as a uid
//!   is killed before it is used and after.
//! * Each attempt gets a scratch directory with an unpredictable name,
//!   mode `0700`, owned by the task's uid, inside a root-owned `0711`
//!   directory that cannot be listed. It holds the token file (`0600`) and
//!   is `HOME` and `TMPDIR`; it is removed when the attempt ends.
//! * The task starts in a process group of its own with an allowlisted
//!   environment ([`ENV_PASSED`] plus the task variables).
//!
//! Not run as root, the wrapper cannot change uids: tasks run as its own
//! user, protected from its memory but not from each other or from files
//! that user can read (the credential file). It says so at start.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

/// Variables of the wrapper's own environment a task may inherit (when set).
/// Everything else a task sees is set by the wrapper: the `DISPATCHER_*`
/// task variables, `HOME` and `TMPDIR` (its scratch directory), and `PATH`.
pub const ENV_PASSED: &[&str] = &["LANG", "TZ"];

/// `PATH` of a task when the wrapper has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Makes this process non-dumpable: no core dumps, and `/proc/<pid>/mem`,
/// `environ` and friends become unreadable to processes of the same user
/// (only `CAP_SYS_PTRACE` reaches them).
pub fn harden_self() -> Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE) takes plain integers and touches no
    // memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        bail!(
            "prctl(PR_SET_DUMPABLE, 0) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A uid range `FIRST-LAST` (inclusive), from `--udf-uids`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl std::str::FromStr for UidRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
        let first: u32 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
        let last: u32 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
        if first == 0 || first > last || last >= u32::MAX - 1 {
            return Err(format!(
                "{s:?}: need 0 < FIRST <= LAST < {} (uid 0 is root; -1 means \"unchanged\")",
                u32::MAX - 1
            ));
        }
        Ok(UidRange { first, last })
    }
}

impl UidRange {
    pub fn len(self) -> u64 {
        u64::from(self.last - self.first) + 1
    }
}

/// Who tasks run as.
enum Identity {
    /// Root: a uid of its own per running task, taken in rotation from
    /// `range` and held with a lock file in `locks`.
    PerTask {
        range: UidRange,
        next: Mutex<u64>,
        locks: PathBuf,
    },
    /// Not root: the wrapper's own user.
    SameUser,
}

/// The wrapper's task sandbox: a root directory for scratch directories and
/// the identities tasks run under.
pub struct Sandbox {
    root: PathBuf,
    identity: Identity,
}

/// A uid held for one attempt: the lock is released when this is dropped.
struct HeldUid {
    uid: u32,
    _lock: File,
}

impl Sandbox {
    /// Creates the scratch root under `parent` (a fresh, unlistable `0711`
    /// directory) and, as root, the uid lock directory `locks` (`0700`,
    /// root's; refused if it exists with any other owner or mode).
    pub fn new(parent: &Path, uids: UidRange, locks: &Path) -> Result<Arc<Sandbox>> {
        let root = parent.join(format!("worker-wrapper-{}", random_name()));
        DirBuilder::new()
            .mode(0o711)
            .create(&root)
            .with_context(|| format!("creating the scratch root {}", root.display()))?;
        // The umask may have narrowed the mode; tasks need the x bit.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))?;
        let identity = if is_root() {
            DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(locks)
                .with_context(|| format!("creating the uid lock directory {}", locks.display()))?;
            let meta = std::fs::symlink_metadata(locks)?;
            if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
                bail!(
                    "the uid lock directory {} must be a directory of root's with mode 0700",
                    locks.display()
                );
            }
            Identity::PerTask {
                range: uids,
                // Wrappers start at different places of the range.
                next: Mutex::new(u64::from(rand_u32()) % uids.len()),
                locks: locks.to_owned(),
            }
        } else {
            Identity::SameUser
        };
        Ok(Arc::new(Sandbox { root, identity }))
    }

    /// What tasks run as, for the start-up log.
    pub fn describe(&self) -> String {
        match &self.identity {
            Identity::PerTask { range, locks, .. } => format!(
                "a uid of its own per task (from {}-{}, locked in {}), scratch under {}",
                range.first,
                range.last,
                locks.display(),
                self.root.display()
            ),
            Identity::SameUser => format!(
                "this process's own user (not root: tasks are not isolated from each other \
                 or from this user's files), scratch under {}",
                self.root.display()
            ),
        }
    }

    /// The scratch root (`0711`, root's when root).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_isolated(&self) -> bool {
        matches!(self.identity, Identity::PerTask { .. })
    }

    /// Takes the next free uid of the range: one no other attempt (of this
    /// or another wrapper) holds, with any process left running as it
    /// killed first.
    fn take_uid(range: UidRange, next: &Mutex<u64>, locks: &Path) -> Result<HeldUid> {
        for _ in 0..range.len() {
            let uid = {
                let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                let uid = range.first + u32::try_from(*n).unwrap_or(0);
                *n = (*n + 1) % range.len();
                uid
            };
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(locks.join(uid.to_string()))
                .with_context(|| format!("opening the lock of uid {uid}"))?;
            // SAFETY: flock on a descriptor we own; no memory is shared.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue; // another attempt holds it
            }
            kill_all_of(uid).with_context(|| format!("sweeping uid {uid}"))?;
            return Ok(HeldUid { uid, _lock: lock });
        }
        bail!(
            "all {} uids of --udf-uids are in use on this machine",
            range.len()
        )
    }

    /// A fresh scratch directory and identity for one attempt.
    pub async fn enter(self: &Arc<Self>) -> Result<Attempt> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.enter_blocking())
            .await
            .context("preparing the sandbox panicked")?
    }

    fn enter_blocking(self: Arc<Self>) -> Result<Attempt> {
        let held = match &self.identity {
            Identity::PerTask { range, next, locks } => Some(Self::take_uid(*range, next, locks)?),
            Identity::SameUser => None,
        };
        let uid = held.as_ref().map(|h| h.uid);
        let dir = self.root.join(random_name());
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let attempt = Attempt {
            sandbox: self.clone(),
            dir,
            held,
            finished: false,
        };
        std::fs::set_permissions(&attempt.dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some(uid) = uid {
            std::os::unix::fs::chown(&attempt.dir, Some(uid), Some(uid))
                .with_context(|| format!("giving {} to uid {uid}", attempt.dir.display()))?;
        }
        Ok(attempt)
    }

    /// Removes the scratch root (at exit).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// One attempt's place to run: its scratch directory and identity.
pub struct Attempt {
    #[allow(dead_code)] // keeps the scratch root alive as long as any attempt
    sandbox: Arc<Sandbox>,
    dir: PathBuf,
    held: Option<HeldUid>,
    finished: bool,
}

impl Attempt {
    pub fn uid(&self) -> Option<u32> {
        self.held.as_ref().map(|h| h.uid)
    }

    /// The attempt's scratch directory (`0700`, the task's).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.join("token")
    }

    /// Writes (or replaces) the token file: `0600`, owned by the task. A
    /// new file with an unpredictable name, created exclusively and never
    /// through a symlink, then renamed into place, so nothing the task
    /// puts in its directory redirects the write.
    pub fn write_token(&self, token: &str) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".token-{}", random_name()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            if let Some(uid) = self.uid() {
                std::os::unix::fs::fchown(&f, Some(uid), Some(uid))?;
            }
            f.write_all(token.as_bytes())?;
            std::fs::rename(&tmp, self.token_file())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// The task's command: the given program in the scratch directory, in
    /// a process group of its own, as the attempt's uid, with only the
    /// allowlisted environment plus `vars`.
    pub fn command(&self, program: &str, vars: &[(&str, String)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.env_clear()
            .envs(
                std::env::vars()
                    .filter(|(k, _)| ENV_PASSED.contains(&k.as_str()))
                    .collect::<Vec<_>>(),
            )
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned()),
            )
            .env("HOME", &self.dir)
            .env("TMPDIR", &self.dir)
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(&self.dir)
            .process_group(0);
        if let Some(uid) = self.uid() {
            // std drops supplementary groups when it changes the uid.
            cmd.uid(uid).gid(uid);
        }
        cmd
    }

    /// A runner's command: like [`Attempt::command`], but its environment
    /// is exactly `vars` (the runner's allowlist is all it gets).
    pub fn exact_command(
        &self,
        program: &str,
        vars: &[(String, String)],
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.env_clear()
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.dir)
            .process_group(0);
        if let Some(uid) = self.uid() {
            cmd.uid(uid).gid(uid);
        }
        cmd
    }

    /// Ends the attempt: kills its process group (`pgid`, the task's pid)
    /// and, with a uid of its own, every process still running as that uid
    /// (even outside the group), then removes the scratch directory and
    /// releases the uid.
    pub async fn finish(mut self, pgid: Option<u32>) {
        if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: killpg takes plain integers. The group was created for
            // this task (process_group(0)); a group that is already gone
            // answers ESRCH, which is fine.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
        let held = self.held.take();
        let dir = self.dir.clone();
        self.finished = true;
        let swept = tokio::task::spawn_blocking(move || {
            let swept = held.as_ref().map(|h| kill_all_of(h.uid)).transpose();
            let _ = std::fs::remove_dir_all(&dir);
            // The lock goes with `held`: the uid is free again. Its next
            // holder sweeps it again before use.
            drop(held);
            swept
        })
        .await;
        if let Ok(Err(e)) | Err(e) = swept.map_err(std::io::Error::other) {
            tracing::warn!(error = %e, "sweeping a task uid failed; its next holder sweeps it again");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped without `finish` (a cancelled invocation, a lost
            // lease, a drain's abort): whatever still runs as the attempt's
            // uid goes now, daemons that left the group included (review
            // M2), then the directory. The sweep is one fork, a kill and a
            // wait (about a millisecond), done here so that it happens even
            // when the runtime is shutting down.
            if let Some(held) = self.held.take() {
                if let Err(e) = kill_all_of(held.uid) {
                    tracing::warn!(error = %e, uid = held.uid,
                        "sweeping a dropped attempt's uid failed; its next holder sweeps it again");
                }
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Kills every process whose uid is `uid`: a child that takes the uid and
/// calls `kill(-1, SIGKILL)`, which the kernel delivers to every process
/// that uid may signal, atomically with respect to `fork`.
fn kill_all_of(uid: u32) -> std::io::Result<()> {
    // SAFETY: between fork and _exit the child makes only raw system calls
    // (async-signal-safe); it never returns into Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => unsafe {
            let ok = libc::syscall(libc::SYS_setresgid, uid, uid, uid) == 0
                && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0;
            if ok {
                // kill(-1) skips the caller itself.
                libc::kill(-1, libc::SIGKILL);
            }
            libc::_exit(if ok { 0 } else { 1 })
        },
        child => {
            let mut status = 0;
            loop {
                // SAFETY: waitpid on our own child with a valid out pointer.
                let rc = unsafe { libc::waitpid(child, &mut status, 0) };
                if rc == child {
                    break;
                }
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "the sweeper could not become uid {uid} (status {status})"
                )))
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn rand_u32() -> u32 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// 128 random bits, hex: a name nobody can guess.
fn random_name() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Reads the worker credential from a file that only its owner can read
/// (`0600` or `0400`); refuses a file that anyone else could.
pub fn read_credential_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading the credential file {}", path.display()))?;
    if !meta.is_file() {
        bail!("the credential file {} is not a file", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "the credential file {} has mode {mode:04o}; it must be readable by its owner only \
             (chmod 600 or 400)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the credential file {}", path.display()))?;
    let credential = text.trim().to_owned();
    if credential.is_empty() {
        bail!("the credential file {} is empty", path.display());
    }
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_ranges_parse_and_refuse_root_and_reversed() {
        assert_eq!(
            "10-20".parse::<UidRange>(),
            Ok(UidRange {
                first: 10,
                last: 20
            })
        );
        for bad in ["0-5", "20-10", "5", "a-b", "1-4294967295"] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn credential_file_readable_by_others_is_refused() {
        let dir = std::env::temp_dir().join(format!("cred-{}", random_name()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("cred");
        std::fs::write(&path, "tok\n").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o644, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = read_credential_file(&path);
            assert_eq!(got.is_ok(), ok, "mode {mode:o}: {got:?}");
            if ok {
                assert_eq!(got.unwrap(), "tok");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
