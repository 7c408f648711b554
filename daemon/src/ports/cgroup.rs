//! cgroup v2: where to attach the programs, and which container a cgroup id
//! belongs to (for the `container` field of port owners).
use std::{
    collections::HashMap,
    ffi::CString,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup v2 mount: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified
/// on a hybrid one. The first of the two whose filesystem is cgroup2.
pub fn find_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|p| is_cgroup2(p))
}

/// Whether `path` is the root of the host's cgroup v2 hierarchy (cgroup id
/// 1). Inside a container's own cgroup namespace the mount's root is the
/// container's cgroup: programs attached there would see the container's
/// sockets only, while claiming to see the host's.
#[cfg(feature = "ebpf")]
pub fn is_host_root(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.ino() == 1)
}

pub fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into the zeroed struct passed; c is a valid
    // NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// The container id in a cgroup directory name: a run of 64 hex digits, as
/// docker (`docker-<id>.scope`, `<id>`), containerd (`cri-containerd-<id>.scope`)
/// and CRI-O (`crio-<id>.scope`) name them.
pub fn container_id_of(dir_name: &str) -> Option<String> {
    let b = dir_name.as_bytes();
    let mut start = 0;
    while start + 64 <= b.len() {
        let run = b[start..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if run >= 64 {
            return Some(dir_name[start..start + 64].to_ascii_lowercase());
        }
        start += run + 1;
    }
    None
}

/// Maps cgroup ids (the inode numbers of cgroup2 directories) to container
/// ids, walking the hierarchy at most once per `min_rewalk` on a miss.
pub struct ContainerIds {
    root: Option<PathBuf>,
    inner: Mutex<Index>,
    min_rewalk: Duration,
}

#[derive(Default)]
struct Index {
    by_id: HashMap<u64, Option<String>>,
    walked_at: Option<Instant>,
}

impl ContainerIds {
    pub fn new(root: Option<PathBuf>) -> Self {
        Self { root, inner: Mutex::new(Index::default()), min_rewalk: Duration::from_secs(10) }
    }

    pub fn lookup(&self, cgroup_id: u64) -> Option<String> {
        if cgroup_id == 0 {
            return None;
        }
        let mut idx = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = idx.by_id.get(&cgroup_id) {
            return hit.clone();
        }
        let root = self.root.as_deref()?;
        if idx.walked_at.is_some_and(|t| t.elapsed() < self.min_rewalk) {
            return None;
        }
        idx.walked_at = Some(Instant::now());
        walk(root, None, &mut idx.by_id, 0);
        idx.by_id.get(&cgroup_id).cloned().flatten()
    }
}

fn walk(dir: &Path, inherited: Option<&str>, out: &mut HashMap<u64, Option<String>>, depth: usize) {
    // Kubernetes hierarchies are about 6 deep; the bound keeps a hostile tree cheap.
    if depth > 16 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(ft) = entry.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        let name = entry.file_name();
        let own = container_id_of(&name.to_string_lossy());
        let id = own.as_deref().or(inherited);
        if let Ok(md) = entry.metadata() {
            out.insert(md.ino(), id.map(str::to_owned));
        }
        walk(&entry.path(), id, out, depth + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_from_runtime_naming_schemes() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for name in [
            id.to_string(),
            format!("docker-{id}.scope"),
            format!("cri-containerd-{id}.scope"),
            format!("crio-{id}.scope"),
        ] {
            assert_eq!(container_id_of(&name).as_deref(), Some(id), "{name}");
        }
        assert_eq!(container_id_of("kubepods-besteffort.slice"), None);
        assert_eq!(container_id_of(&id[..63]), None);
    }

    #[test]
    fn finds_a_cgroup2_root_on_this_host() {
        let root = find_root().expect("cgroup2 mounted");
        assert!(is_cgroup2(&root));
        #[cfg(feature = "ebpf")]
        assert!(is_host_root(&root), "the test host's own root cgroup");
        assert!(!is_cgroup2(Path::new("/tmp")));
        #[cfg(feature = "ebpf")]
        {
            let child = root.join(format!("polarstack-test-{}", std::process::id()));
            std::fs::create_dir(&child).expect("create a child cgroup (root, cgroup v2)");
            let is_root = is_host_root(&child);
            let _ = std::fs::remove_dir(&child);
            assert!(!is_root, "a child cgroup is not the root");
        }
    }
}
