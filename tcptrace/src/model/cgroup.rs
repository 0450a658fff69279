//! Cgroup names: a socket's cgroup id (from the kernel) turned into the path of its cgroup
//! and, where the path follows a container runtime's naming, the container.
//!
//! The id the kernel reports is the cgroup's `kernfs_node.id`, which is also the inode
//! number of the cgroup's directory under the cgroup2 (unified) mount: resolving it is a
//! walk of that mount, matching inode numbers. [`Cgroups`] caches the walk and walks again
//! on a miss, at most once a second (ten times a second for ids newer than any seen: a
//! container just started), so a stream of unknown ids costs next to nothing. Ids are only
//! meaningful on the host and boot that produced them.
//!
//! [`container_of`] and [`pod_of`] are pure: they read the usual path shapes of docker,
//! containerd, CRI-O, podman, Kubernetes (systemd and cgroupfs drivers), systemd-nspawn and
//! LXC.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The container runtime whose naming a cgroup path follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// `docker-<id>.scope` (systemd driver) or `/docker/<id>` (cgroupfs driver).
    Docker,
    /// `cri-containerd-<id>.scope` (Kubernetes with containerd, systemd driver).
    Containerd,
    /// `crio-<id>.scope` (Kubernetes with CRI-O).
    CriO,
    /// `libpod-<id>.scope` or `/libpod_parent/libpod-<id>` (podman).
    Podman,
    /// A bare container id under `kubepods` (cgroupfs driver: the runtime does not say).
    Kubernetes,
    /// `machine-<name>.scope` under `machine.slice` (systemd-nspawn, and other machines
    /// registered with systemd-machined).
    Nspawn,
    /// `lxc.payload.<name>` or `/lxc/<name>`.
    Lxc,
    /// A bare 64-hex-digit container id elsewhere (containerd's own cgroupfs layout, …).
    Unknown,
}

impl Runtime {
    /// The name used in text and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Podman => "podman",
            Runtime::Kubernetes => "kubernetes",
            Runtime::Nspawn => "nspawn",
            Runtime::Lxc => "lxc",
            Runtime::Unknown => "unknown",
        }
    }
}

/// A container recognised in a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// Whose naming the path follows.
    pub runtime: Runtime,
    /// The container id (64 hex digits for docker, containerd, CRI-O and podman) or name
    /// (systemd-nspawn, LXC).
    pub id: String,
}

impl Container {
    /// The id as `docker ps` shows it: the first 12 characters.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// What a cgroup id resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupName {
    /// The cgroup's path relative to the cgroup2 mount, starting with `/` (`/` is the root
    /// cgroup).
    pub path: String,
    /// The container the path names, if it follows a known runtime's naming.
    pub container: Option<Container>,
    /// The Kubernetes pod uid, if the path is under `kubepods`.
    pub pod: Option<String>,
}

impl CgroupName {
    /// Parses what `path` names.
    pub fn new(path: impl Into<String>) -> CgroupName {
        let path = path.into();
        CgroupName {
            container: container_of(&path),
            pod: pod_of(&path),
            path,
        }
    }
}

/// Whether `s` is a full container id: 64 lowercase hex digits.
fn is_full_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reverses systemd's unit-name escaping of `-` and other bytes (`\x2d`).
fn systemd_unescape(s: &str) -> String {
    unescape(s, "x", 2, 16)
}

/// Replaces every `\` + `lead` + `digits` digits in `radix` by the byte they encode; any
/// other backslash stays as it is.
fn unescape(s: &str, lead: &str, digits: usize, radix: u32) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let skip = 1 + lead.len();
    while i < b.len() {
        if b[i] == b'\\'
            && s.get(i + 1..i + skip) == Some(lead)
            && let Some(code) = s.get(i + skip..i + skip + digits)
            && let Ok(v) = u8::from_str_radix(code, radix)
        {
            out.push(v);
            i += skip + digits;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The container a cgroup path names, read from its deepest component that follows a known
/// runtime's naming (a container may nest cgroups of its own below its scope).
pub fn container_of(path: &str) -> Option<Container> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate().rev() {
        let parent = i.checked_sub(1).map(|p| parts[p]);
        let unit = part.strip_suffix(".scope").unwrap_or(part);
        let prefixed = [
            ("docker-", Runtime::Docker),
            ("cri-containerd-", Runtime::Containerd),
            ("crio-", Runtime::CriO),
            ("libpod-", Runtime::Podman),
        ];
        for (prefix, runtime) in prefixed {
            if let Some(id) = unit.strip_prefix(prefix)
                && is_full_id(id)
            {
                return Some(Container {
                    runtime,
                    id: id.to_string(),
                });
            }
        }
        if is_full_id(part) {
            let runtime = if parent == Some("docker") {
                Runtime::Docker
            } else if parts[..i].iter().any(|p| p.starts_with("kubepods")) {
                Runtime::Kubernetes
            } else {
                Runtime::Unknown
            };
            return Some(Container {
                runtime,
                id: part.to_string(),
            });
        }
        if parent == Some("machine.slice")
            && let Some(name) = part
                .strip_suffix(".scope")
                .and_then(|u| u.strip_prefix("machine-"))
            && !name.is_empty()
        {
            return Some(Container {
                runtime: Runtime::Nspawn,
                id: systemd_unescape(name),
            });
        }
        let lxc = part
            .strip_prefix("lxc.payload.")
            .or(if parent == Some("lxc") {
                Some(part)
            } else {
                None
            });
        if let Some(name) = lxc
            && !name.is_empty()
        {
            return Some(Container {
                runtime: Runtime::Lxc,
                id: name.to_string(),
            });
        }
    }
    None
}

/// Whether `s` looks like a Kubernetes pod uid: a UUID, or the 32 hex digits of a static
/// pod's hash.
fn is_pod_uid(s: &str) -> bool {
    (s.len() == 36 || s.len() == 32) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The Kubernetes pod uid in a cgroup path: `…/kubepods-burstable-pod<uid>.slice/…`
/// (systemd driver, `-` escaped as `_`) or `/kubepods/burstable/pod<uid>/…` (cgroupfs).
pub fn pod_of(path: &str) -> Option<String> {
    if !path.contains("kubepods") {
        return None;
    }
    for part in path.split('/') {
        let uid = if let Some(slice) = part.strip_suffix(".slice") {
            slice.rsplit_once("-pod").map(|(_, u)| u.replace('_', "-"))
        } else {
            part.strip_prefix("pod").map(str::to_string)
        };
        if let Some(uid) = uid
            && is_pod_uid(&uid)
        {
            return Some(uid);
        }
    }
    None
}

/// Whether cgroup `path` is `within` or one of its descendants.
pub fn path_within(path: &str, within: &str) -> bool {
    within == "/"
        || path
            .strip_prefix(within)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// What `--cgroup` selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupFilter {
    /// A cgroup path (relative to the cgroup2 mount) and everything below it.
    Path(String),
    /// A container id, pod uid or container name, or a prefix of one (`3f2a9c`).
    Container(String),
}

impl CgroupFilter {
    /// Parses a `--cgroup` value: a path (starting with `/`; the cgroup2 mount point, if
    /// given as part of it, is dropped) or a container id, pod uid or name prefix.
    pub fn parse(s: &str, mount: Option<&Path>) -> Result<CgroupFilter, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(
                "an empty cgroup: give a path like /system.slice/nginx.service or a \
                        container id"
                    .into(),
            );
        }
        if !s.starts_with('/') {
            if s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            {
                return Ok(CgroupFilter::Container(s.to_string()));
            }
            return Err(format!(
                "'{s}' is neither a cgroup path (starting with /) nor a container id or name"
            ));
        }
        let mut rel = s;
        if let Some(m) = mount.and_then(Path::to_str)
            && m != "/"
            && let Some(rest) = s.strip_prefix(m.trim_end_matches('/'))
            && (rest.is_empty() || rest.starts_with('/'))
        {
            rel = rest;
        }
        let mut parts = Vec::new();
        for p in rel.split('/').filter(|p| !p.is_empty()) {
            if p == "." || p == ".." {
                return Err(format!("'{s}': a cgroup path cannot contain '.' or '..'"));
            }
            parts.push(p);
        }
        Ok(CgroupFilter::Path(format!("/{}", parts.join("/"))))
    }

    /// Whether a resolved cgroup is selected.
    pub fn matches(&self, name: &CgroupName) -> bool {
        match self {
            CgroupFilter::Path(p) => path_within(&name.path, p),
            CgroupFilter::Container(prefix) => {
                name.container
                    .as_ref()
                    .is_some_and(|c| c.id.starts_with(prefix.as_str()))
                    || name
                        .pod
                        .as_ref()
                        .is_some_and(|p| p.starts_with(prefix.as_str()))
            }
        }
    }
}

/// Where the cgroup2 hierarchy is mounted, from the text of `/proc/self/mountinfo`: a mount
/// of the whole hierarchy (root `/`) first, else any.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut any = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let f: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(point)) = (f.get(3), f.get(4)) else {
            continue;
        };
        let point = PathBuf::from(unescape_mount(point));
        if *root == "/" {
            return Some(point);
        }
        any.get_or_insert(point);
    }
    any
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    unescape(s, "", 3, 8)
}

/// This host's cgroup2 mount point, if it has one.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&text)
}

/// At most this many cgroups are kept (a walk stops there).
pub const MAX_CGROUPS: usize = 65_536;
/// A walk descends at most this deep.
const MAX_DEPTH: usize = 32;
/// A miss walks the hierarchy again at most this often…
const REFRESH: Duration = Duration::from_secs(1);
/// …or this often when the id is newer than any seen (ids only grow: a cgroup just made).
const REFRESH_NEW: Duration = Duration::from_millis(100);

/// Resolves cgroup ids to [`CgroupName`]s, with a shared cache: clones share it, and it
/// may be used from any thread.
#[derive(Clone, Debug, Default)]
pub struct Cgroups {
    inner: Option<Arc<Mutex<Cache>>>,
}

#[derive(Debug, Default)]
struct Cache {
    /// The cgroup2 mount point to walk (None: a fixed table).
    root: Option<PathBuf>,
    names: HashMap<u64, Arc<CgroupName>>,
    /// The largest id the last walk found.
    newest: u64,
    last_walk: Option<Instant>,
    walks: u64,
}

impl Cgroups {
    /// Resolves nothing: every cgroup is shown as its id (a recording from another boot).
    pub fn none() -> Cgroups {
        Cgroups { inner: None }
    }

    /// Resolves against this host's cgroup2 mount; resolves nothing if there is none.
    pub fn host() -> Cgroups {
        match cgroup2_mount() {
            Some(root) => Cgroups::at(root),
            None => {
                log::info!("no cgroup2 mount: cgroups are shown as ids");
                Cgroups::none()
            }
        }
    }

    /// Resolves against the cgroup2 hierarchy mounted at `root`.
    pub fn at(root: PathBuf) -> Cgroups {
        Cgroups {
            inner: Some(Arc::new(Mutex::new(Cache {
                root: Some(root),
                ..Cache::default()
            }))),
        }
    }

    /// A fixed table of ids and paths, never walked (tests, synthetic workloads).
    pub fn from_paths<S: Into<String>>(paths: impl IntoIterator<Item = (u64, S)>) -> Cgroups {
        let names = paths
            .into_iter()
            .map(|(id, p)| (id, Arc::new(CgroupName::new(p))))
            .collect();
        Cgroups {
            inner: Some(Arc::new(Mutex::new(Cache {
                names,
                ..Cache::default()
            }))),
        }
    }

    /// The mount point walked, if any.
    pub fn root(&self) -> Option<PathBuf> {
        self.lock()?.root.clone()
    }

    /// How many times the hierarchy was walked so far.
    pub fn walks(&self) -> u64 {
        self.lock().map_or(0, |c| c.walks)
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, Cache>> {
        // A panic elsewhere while holding the lock left a cache that is still consistent
        // (every update is a whole-map swap): keep using it.
        Some(
            self.inner
                .as_ref()?
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// What cgroup `id` is, walking the hierarchy again if it is not known yet and the
    /// last walk is old enough; None if it cannot be found (a cgroup already removed, or
    /// one from another boot).
    pub fn resolve(&self, id: u64) -> Option<Arc<CgroupName>> {
        let mut c = self.lock()?;
        if let Some(n) = c.names.get(&id) {
            return Some(n.clone());
        }
        let root = c.root.clone()?;
        let wait = if id > c.newest { REFRESH_NEW } else { REFRESH };
        if c.last_walk.is_some_and(|t| t.elapsed() < wait) {
            return None;
        }
        c.last_walk = Some(Instant::now());
        c.walks += 1;
        let found = walk(&root);
        let newest = found.keys().copied().max().unwrap_or(0);
        let mut names = HashMap::with_capacity(found.len());
        for (ino, path) in found {
            let name = match c.names.get(&ino) {
                Some(old) if old.path == path => old.clone(),
                _ => Arc::new(CgroupName::new(path)),
            };
            names.insert(ino, name);
        }
        // Cgroups removed since keep their names while there is room: late events of a
        // container that just stopped still resolve.
        for (ino, name) in &c.names {
            if names.len() >= MAX_CGROUPS {
                break;
            }
            names.entry(*ino).or_insert_with(|| name.clone());
        }
        c.names = names;
        c.newest = c.newest.max(newest);
        c.names.get(&id).cloned()
    }
}

/// Every directory under `root` (bounded in count and depth): inode number → path relative
/// to `root` (`/` for the root itself). Unreadable directories are skipped.
fn walk(root: &Path) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let Ok(meta) = std::fs::metadata(root) else {
        return out;
    };
    out.insert(meta.ino(), "/".to_string());
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            // The directory entry's type needs no stat; only directories are cgroups.
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(meta) = e.metadata() else {
                continue;
            };
            if out.len() >= MAX_CGROUPS {
                return out;
            }
            let path = format!("{rel}/{}", e.file_name().to_string_lossy());
            out.insert(meta.ino(), path.clone());
            if depth + 1 < MAX_DEPTH {
                stack.push((e.path(), path, depth + 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c1e6a7b2d9c8e0f3a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f901";

    #[test]
    fn containers_in_the_usual_path_shapes() {
        let pod = "8a7b6c5d-1234-4abc-9def-0123456789ab";
        let pod_ = pod.replace('-', "_");
        /// A path, the container it names, the pod it is in.
        type Case<'a> = (String, Option<(Runtime, &'a str)>, Option<&'a str>);
        let cases: Vec<Case> = vec![
            (
                format!("/system.slice/docker-{ID}.scope"),
                Some((Runtime::Docker, ID)),
                None,
            ),
            (format!("/docker/{ID}"), Some((Runtime::Docker, ID)), None),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/cri-containerd-{ID}.scope"
                ),
                Some((Runtime::Containerd, ID)),
                Some(pod),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{pod_}.slice/crio-{ID}.scope"),
                Some((Runtime::CriO, ID)),
                Some(pod),
            ),
            (
                format!("/kubepods/besteffort/pod{pod}/{ID}"),
                Some((Runtime::Kubernetes, ID)),
                Some(pod),
            ),
            // The pod's own cgroup: a pod, no container.
            (format!("/kubepods/burstable/pod{pod}"), None, Some(pod)),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
                ),
                Some((Runtime::Podman, ID)),
                None,
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                Some((Runtime::Podman, ID)),
                None,
            ),
            (
                format!("/libpod_parent/libpod-{ID}"),
                Some((Runtime::Podman, ID)),
                None,
            ),
            // conmon, the runtime's monitor, is not the container.
            (
                format!("/machine.slice/libpod-conmon-{ID}.scope"),
                None,
                None,
            ),
            (format!("/system.slice/crio-conmon-{ID}.scope"), None, None),
            (
                "/machine.slice/machine-web\\x2d1.scope/payload".to_string(),
                Some((Runtime::Nspawn, "web-1")),
                None,
            ),
            (
                "/lxc.payload.db/init.scope".to_string(),
                Some((Runtime::Lxc, "db")),
                None,
            ),
            ("/lxc/db".to_string(), Some((Runtime::Lxc, "db")), None),
            (format!("/default/{ID}"), Some((Runtime::Unknown, ID)), None),
            // A container's own nested cgroups: the deepest container component wins.
            (
                format!("/system.slice/docker-{ID}.scope/system.slice/nginx.service"),
                Some((Runtime::Docker, ID)),
                None,
            ),
            // Not containers.
            ("/".to_string(), None, None),
            ("/system.slice/nginx.service".to_string(), None, None),
            (
                "/user.slice/user-1000.slice/session-3.scope".to_string(),
                None,
                None,
            ),
            ("/system.slice/docker.service".to_string(), None, None),
            // Too short to be a full id: docker-compose and the like.
            ("/system.slice/docker-compose.scope".to_string(), None, None),
            (
                format!("/system.slice/docker-{}.scope", &ID[..12]),
                None,
                None,
            ),
            (
                format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
                None,
                None,
            ),
        ];
        for (path, container, pod) in cases {
            let got = container_of(&path);
            assert_eq!(
                got.as_ref().map(|c| (c.runtime, c.id.as_str())),
                container,
                "{path}"
            );
            assert_eq!(pod_of(&path).as_deref(), pod, "{path}");
        }
        let c = container_of(&format!("/docker/{ID}")).unwrap();
        assert_eq!(c.short_id(), &ID[..12]);
    }

    #[test]
    fn paths_within_a_cgroup() {
        assert!(path_within("/system.slice/nginx.service", "/system.slice"));
        assert!(path_within("/system.slice", "/system.slice"));
        assert!(path_within("/anything", "/"));
        assert!(!path_within("/system.slice2/x", "/system.slice"));
        assert!(!path_within("/system", "/system.slice"));
    }

    #[test]
    fn cgroup_filters_parse_and_match() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        let p = |s: &str| CgroupFilter::parse(s, Some(mount));
        assert_eq!(
            p("/system.slice/nginx.service/").unwrap(),
            CgroupFilter::Path("/system.slice/nginx.service".into())
        );
        assert_eq!(
            p("/sys/fs/cgroup/unified/system.slice//x").unwrap(),
            CgroupFilter::Path("/system.slice/x".into())
        );
        assert_eq!(
            p("/sys/fs/cgroup/unified").unwrap(),
            CgroupFilter::Path("/".into())
        );
        // Another path that merely starts with the mount's name is not under it.
        assert_eq!(
            p("/sys/fs/cgroup/unifiedx").unwrap(),
            CgroupFilter::Path("/sys/fs/cgroup/unifiedx".into())
        );
        assert_eq!(
            p("4f1c1e6a").unwrap(),
            CgroupFilter::Container("4f1c1e6a".into())
        );
        assert!(p("").unwrap_err().contains("empty"));
        assert!(p("/a/../b").unwrap_err().contains("'..'"));
        assert!(p("web app").unwrap_err().contains("'web app'"));

        let docker = CgroupName::new(format!("/system.slice/docker-{ID}.scope"));
        let nginx = CgroupName::new("/system.slice/nginx.service");
        let pod = CgroupName::new("/kubepods/burstable/pod8a7b6c5d-1234-4abc-9def-0123456789ab");
        assert!(p("/system.slice").unwrap().matches(&docker));
        assert!(p("/system.slice/nginx.service").unwrap().matches(&nginx));
        assert!(!p("/system.slice/nginx").unwrap().matches(&nginx));
        assert!(p("4f1c1e6a").unwrap().matches(&docker));
        assert!(!p("4f1c1e6b").unwrap().matches(&docker));
        assert!(!p("4f1c1e6a").unwrap().matches(&nginx));
        assert!(p("8a7b6c5d").unwrap().matches(&pod));
    }

    #[test]
    fn the_cgroup2_mount_from_mountinfo() {
        let hybrid = "\
25 30 0:23 / /sys ro,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // A container's bind of its own subtree, then the whole hierarchy: the whole one.
        let both = "\
40 30 0:26 /system.slice/docker-x.scope /sys/fs/cgroup rw - cgroup2 cgroup2 rw
41 30 0:26 / /mnt/cg\\040all rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(both),
            Some(PathBuf::from("/mnt/cg all"))
        );
        assert_eq!(parse_cgroup2_mount(hybrid.lines().next().unwrap()), None);
        assert_eq!(parse_cgroup2_mount("garbage\n\n - \n"), None);
    }

    #[test]
    fn systemd_unescaping() {
        assert_eq!(systemd_unescape("web\\x2d1"), "web-1");
        assert_eq!(systemd_unescape("a\\x2"), "a\\x2");
        assert_eq!(systemd_unescape("plain"), "plain");
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/a\\09"), "/a\\09");
        assert_eq!(unescape_mount("/a\\x2d"), "/a\\x2d");
    }

    #[test]
    fn a_fixed_table_resolves_without_walking() {
        let cg = Cgroups::from_paths([(7, "/system.slice/x.service")]);
        assert_eq!(cg.resolve(7).unwrap().path, "/system.slice/x.service");
        assert!(cg.resolve(8).is_none());
        assert_eq!(cg.walks(), 0);
        assert!(Cgroups::none().resolve(7).is_none());
    }

    /// The walk and its cache on an ordinary directory tree: inode numbers to paths, a miss
    /// walks again (rate-limited), a removed directory keeps its name.
    #[test]
    fn walking_a_tree_resolves_inodes_and_rate_limits_misses() {
        let dir = std::env::temp_dir().join(format!("tcptrace-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("system.slice/nginx.service")).unwrap();
        std::fs::write(dir.join("system.slice/cgroup.procs"), "").unwrap();
        let ino = |p: &str| std::fs::metadata(dir.join(p)).unwrap().ino();
        let cg = Cgroups::at(dir.clone());
        assert_eq!(cg.resolve(ino("")).unwrap().path, "/");
        assert_eq!(
            cg.resolve(ino("system.slice/nginx.service")).unwrap().path,
            "/system.slice/nginx.service"
        );
        assert_eq!(cg.walks(), 1, "one walk serves every known id");
        assert!(
            cg.resolve(ino("system.slice/cgroup.procs")).is_none(),
            "files are not cgroups"
        );
        // An old id still unknown: no second walk within the second.
        let walks = cg.walks();
        assert!(cg.resolve(1).is_none());
        assert_eq!(cg.walks(), walks);
        // A new directory (a newer id) is found after the short wait.
        std::fs::create_dir(dir.join("system.slice/new.scope")).unwrap();
        let new = ino("system.slice/new.scope");
        std::thread::sleep(REFRESH_NEW + Duration::from_millis(20));
        let found = cg.resolve(new).map(|n| n.path.clone());
        // Inode numbers of an ordinary filesystem need not grow; kernfs ids do.
        if found.is_none() {
            std::thread::sleep(REFRESH);
        }
        assert_eq!(cg.resolve(new).unwrap().path, "/system.slice/new.scope");
        // Removed, it keeps its name.
        std::fs::remove_dir(dir.join("system.slice/new.scope")).unwrap();
        std::thread::sleep(REFRESH + Duration::from_millis(20));
        assert!(cg.resolve(u64::MAX - 1).is_none());
        assert_eq!(cg.resolve(new).unwrap().path, "/system.slice/new.scope");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
