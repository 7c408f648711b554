//! Field offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`). The socket iterator (`ebpf.rs`) reads kernel
//! memory at these offsets; computing them here, per kernel, is what CO-RE
//! relocations would do for a C program, which the Rust toolchain does not
//! emit.
//!
//! Only what the iterator needs is parsed: the type table, and for structs
//! and unions their members (anonymous members are searched through, as C
//! field access does).
use std::{collections::HashMap, io};

use polarstack_ebpf_common::IterOffsets;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read { path: &'static str, source: io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {ty} has no field {field}")]
    NoField { ty: String, field: String },
    #[error("BTF field {ty}.{field} is a bitfield or of an unexpected size ({size} bytes, {want} expected)")]
    Shape { ty: String, field: String, size: u32, want: u32 },
}

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset from the start of the enclosing type.
    bit_offset: u32,
    /// 0 unless a bitfield.
    bitfield_size: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: u32,
    /// Size for ints, structs, unions, enums; the referenced type for
    /// pointers, typedefs and qualifiers.
    size_or_type: u32,
    members: Vec<Member>,
}

/// The kernel's types, parsed.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BtfError> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]])).ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        const PATH: &str = "/sys/kernel/btf/vmlinux";
        let raw = std::fs::read(PATH).map_err(|source| BtfError::Read { path: PATH, source })?;
        Self::parse(&raw)
    }

    pub fn parse(raw: &[u8]) -> Result<Self, BtfError> {
        if u16_at(raw, 0)? != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (big-endian BTF is not supported)"));
        }
        let hdr_len = u32_at(raw, 4)? as usize;
        let (type_off, type_len) = (u32_at(raw, 8)? as usize, u32_at(raw, 12)? as usize);
        let (str_off, str_len) = (u32_at(raw, 16)? as usize, u32_at(raw, 20)? as usize);
        let types_raw =
            raw.get(hdr_len + type_off..hdr_len + type_off + type_len).ok_or(BtfError::Malformed("type section"))?;
        let strings =
            raw.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or(BtfError::Malformed("string section"))?;
        // Type ids start at 1; id 0 is void.
        let mut types = vec![Type { kind: 0, name: 0, size_or_type: 0, members: Vec::new() }];
        let mut at = 0;
        while at < types_raw.len() {
            let name = u32_at(types_raw, at)?;
            let info = u32_at(types_raw, at + 4)?;
            let size_or_type = u32_at(types_raw, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let off = u32_at(types_raw, m + 8)?;
                        let (bit_offset, bitfield_size) =
                            if kind_flag { (off & 0xff_ffff, off >> 24) } else { (off, 0) };
                        members.push(Member {
                            name: u32_at(types_raw, m)?,
                            ty: u32_at(types_raw, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM => vlen * 8,
                KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | KIND_FLOAT | KIND_TYPE_TAG => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            types.push(Type { kind, name, size_or_type, members });
        }
        let mut btf = Self { types, strings: strings.to_vec(), structs: HashMap::new() };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let n = btf.name(t.name).to_owned();
                // The first definition wins (a later one of the same name
                // would be a module's).
                btf.structs.entry(n).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.size_or_type,
                _ => return Some(t),
            }
        }
        None
    }

    /// The size in bytes of a resolved type (pointers are 8).
    fn size_of(&self, id: u32) -> u32 {
        match self.resolve(id) {
            Some(t) if t.kind == KIND_PTR => 8,
            Some(t) if t.kind == KIND_ARRAY => 0, // not needed here
            Some(t) => t.size_or_type,
            None => 0,
        }
    }

    /// Finds member `field` of the type `ty`, through anonymous members;
    /// returns its bit offset and the member.
    fn find<'a>(&'a self, ty: &'a Type, field: &str) -> Option<(u32, &'a Member)> {
        for m in &ty.members {
            if m.name != 0 && self.name(m.name) == field {
                return Some((m.bit_offset, m));
            }
        }
        for m in ty.members.iter().filter(|m| m.name == 0) {
            let inner = self.resolve(m.ty)?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                if let Some((off, found)) = self.find(inner, field) {
                    return Some((m.bit_offset + off, found));
                }
            }
        }
        None
    }

    /// The byte offset of `path` (a field, or fields of nested structs by
    /// value) in struct `ty`, checked to be a whole field of `size` bytes
    /// (0: any size).
    pub fn offset(&self, ty: &str, path: &[&str], size: u32) -> Result<u32, BtfError> {
        let id = *self.structs.get(ty).ok_or_else(|| BtfError::NoStruct(ty.into()))?;
        let mut t = self.resolve(id).ok_or_else(|| BtfError::NoStruct(ty.into()))?;
        let mut bits = 0;
        let no_field = || BtfError::NoField { ty: ty.into(), field: path.join(".") };
        let mut last: Option<&Member> = None;
        for (i, field) in path.iter().enumerate() {
            let (off, m) = self.find(t, field).ok_or_else(no_field)?;
            bits += off;
            last = Some(m);
            if i + 1 < path.len() {
                t = self.resolve(m.ty).filter(|n| matches!(n.kind, KIND_STRUCT | KIND_UNION)).ok_or_else(no_field)?;
            }
        }
        let m = last.ok_or_else(no_field)?;
        let actual = self.size_of(m.ty);
        if m.bitfield_size != 0 || bits % 8 != 0 || (size != 0 && actual != size) {
            return Err(BtfError::Shape { ty: ty.into(), field: path.join("."), size: actual, want: size });
        }
        Ok(bits / 8)
    }
}

/// The offsets the socket iterator reads at, for this kernel, and the
/// watched namespace's inode number.
pub fn iter_offsets(btf: &Btf, watched_netns_inum: u32) -> Result<IterOffsets, BtfError> {
    // The iterator reads sock_common's fields through a `struct sock *`:
    // that holds only while sock_common is its first member.
    if btf.offset("sock", &["__sk_common"], 0)? != 0 {
        return Err(BtfError::Malformed("struct sock does not start with its sock_common"));
    }
    let sc = |field: &str, size| btf.offset("sock_common", &[field], size);
    Ok(IterOffsets {
        file_inode: btf.offset("file", &["f_inode"], 8)?,
        file_private_data: btf.offset("file", &["private_data"], 8)?,
        inode_mode: btf.offset("inode", &["i_mode"], 2)?,
        inode_ino: btf.offset("inode", &["i_ino"], 8)?,
        socket_sk: btf.offset("socket", &["sk"], 8)?,
        sk_family: sc("skc_family", 2)?,
        sk_state: sc("skc_state", 1)?,
        sk_num: sc("skc_num", 2)?,
        sk_rcv_saddr: sc("skc_rcv_saddr", 4)?,
        sk_v6_rcv_saddr: sc("skc_v6_rcv_saddr", 16)?,
        sk_net: sc("skc_net", 8)?,
        sk_cookie: sc("skc_cookie", 8)?,
        // A bitfield before Linux 5.6: then the iterator cannot be used.
        sk_protocol: btf.offset("sock", &["sk_protocol"], 2)?,
        net_ns_inum: btf.offset("net", &["ns", "inum"], 4)?,
        task_tgid: btf.offset("task_struct", &["tgid"], 4)?,
        task_comm: btf.offset("task_struct", &["comm"], 0)?,
        watched_netns_inum,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_offset_the_iterator_needs_exists_on_this_kernel() {
        let btf = Btf::from_sys_fs().expect("/sys/kernel/btf/vmlinux");
        let o = iter_offsets(&btf, 7).expect("offsets");
        assert_eq!(o.sk_family, 16);
        assert_eq!(o.watched_netns_inum, 7);
        assert!(o.task_comm > o.task_tgid, "comm comes after tgid in task_struct");
    }

    /// The running kernel's BTF (every kernel the daemon supports has it).
    #[test]
    fn offsets_of_this_kernel_match_what_is_known_of_them() {
        let btf = Btf::from_sys_fs().expect("/sys/kernel/btf/vmlinux");
        // struct sock starts with its sock_common; skc_family follows the
        // address and port pairs (8 + 4 + 4 bytes) on 64-bit kernels.
        assert_eq!(btf.offset("sock", &["__sk_common"], 0).expect("__sk_common"), 0);
        assert_eq!(btf.offset("sock_common", &["skc_family"], 2).expect("skc_family"), 16);
        // Anonymous unions and structs are searched through.
        let num = btf.offset("sock_common", &["skc_num"], 2).expect("skc_num");
        assert_eq!(num, btf.offset("sock_common", &["skc_portpair"], 4).expect("skc_portpair") + 2);
        assert!(btf.offset("net", &["ns", "inum"], 4).is_ok());
        assert!(btf.offset("task_struct", &["comm"], 0).is_ok());
        assert!(matches!(btf.offset("sock_common", &["no_such_field"], 0), Err(BtfError::NoField { .. })));
        assert!(matches!(btf.offset("sock_common", &["skc_family"], 8), Err(BtfError::Shape { .. })));
        assert!(matches!(btf.offset("no_such_struct", &["x"], 0), Err(BtfError::NoStruct(_))));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 100, 0, 0, 0]).is_err());
    }
}
