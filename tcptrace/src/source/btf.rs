//! Just enough of the BPF Type Format to find struct member offsets in the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`), so nothing about kernel structures is hard-coded.
//!
//! Format: a header, a type section and a string section (see the kernel's
//! `Documentation/bpf/btf.rst`). Types are numbered from 1 in order; each is a 12-byte
//! `btf_type` followed by kind-specific data whose length this reader must know to skip.

use std::collections::HashMap;

/// Why BTF could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("not BTF (bad magic)")]
    Magic,
    #[error("truncated BTF at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {0}")]
    Kind(u32),
    #[error("struct {0} is not in the kernel's BTF")]
    NoStruct(String),
    #[error("{0} has no member {1}")]
    NoMember(String, String),
}

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

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// For modifiers, typedefs and pointers: the type referred to.
    refers: u32,
    /// For function prototypes: how many parameters.
    params: usize,
    members: Vec<Member>,
}

/// The kernel's types, enough to resolve member offsets.
pub struct Btf {
    strings: Vec<u8>,
    types: Vec<Type>,
    structs: HashMap<String, u32>,
    typedefs: HashMap<String, u32>,
    enums: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated(at))
}

/// From the header: where the type section lies in `b`, and the string section's bytes.
fn sections(b: &[u8]) -> Result<(std::ops::Range<usize>, Vec<u8>), BtfError> {
    if b.get(0..2) != Some(&[0x9f, 0xeb]) {
        return Err(BtfError::Magic);
    }
    let hdr_len = u32_at(b, 4)? as usize;
    let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
    let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
    let types_at = hdr_len + type_off;
    let strs_at = hdr_len + str_off;
    let strings = b
        .get(strs_at..strs_at + str_len)
        .ok_or(BtfError::Truncated(strs_at))?
        .to_vec();
    Ok((types_at..types_at + type_len, strings))
}

/// The type whose `btf_type` starts at `at`, and where the next one starts.
fn read_type(b: &[u8], at: usize) -> Result<(Type, usize), BtfError> {
    let name = u32_at(b, at)?;
    let info = u32_at(b, at + 4)?;
    let size_or_type = u32_at(b, at + 8)?;
    let kind = (info >> 24) & 0x1f;
    let vlen = (info & 0xffff) as usize;
    let kind_flag = info >> 31 == 1;
    let at = at + 12;
    let mut members = Vec::new();
    let extra = match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION => {
            members = read_members(b, at, vlen, kind_flag)?;
            vlen * 12
        }
        KIND_ENUM => {
            members = read_enumerators(b, at, vlen)?;
            vlen * 8
        }
        KIND_FUNC_PROTO => vlen * 8,
        KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        k => return Err(BtfError::Kind(k)),
    };
    let t = Type {
        name,
        kind,
        refers: size_or_type,
        params: if kind == KIND_FUNC_PROTO { vlen } else { 0 },
        members,
    };
    Ok((t, at + extra))
}

/// A struct's or union's `vlen` members, from `at`; `kind_flag` says their offsets carry a
/// bitfield size in the top byte.
fn read_members(
    b: &[u8],
    at: usize,
    vlen: usize,
    kind_flag: bool,
) -> Result<Vec<Member>, BtfError> {
    let mut members = Vec::new();
    for i in 0..vlen {
        let m = at + i * 12;
        let off = u32_at(b, m + 8)?;
        members.push(Member {
            name: u32_at(b, m)?,
            ty: u32_at(b, m + 4)?,
            bit_offset: if kind_flag { off & 0xff_ffff } else { off },
        });
    }
    Ok(members)
}

/// An enum's `vlen` enumerators, from `at`: each its name and its (32-bit) value, kept as a
/// member.
fn read_enumerators(b: &[u8], at: usize, vlen: usize) -> Result<Vec<Member>, BtfError> {
    let mut members = Vec::new();
    for i in 0..vlen {
        let m = at + i * 8;
        members.push(Member {
            name: u32_at(b, m)?,
            ty: u32_at(b, m + 4)?,
            bit_offset: 0,
        });
    }
    Ok(members)
}

impl Btf {
    /// Parses raw BTF (little-endian, as `/sys/kernel/btf/vmlinux` holds it).
    pub fn parse(b: &[u8]) -> Result<Btf, BtfError> {
        let (type_section, strings) = sections(b)?;
        // Type 0 is void.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            refers: 0,
            params: 0,
            members: Vec::new(),
        }];
        let mut typedefs = HashMap::new();
        let mut at = type_section.start;
        while at < type_section.end {
            let (t, next) = read_type(b, at)?;
            if t.kind == KIND_TYPEDEF && t.name != 0 {
                typedefs.insert(t.name, types.len() as u32);
            }
            types.push(t);
            at = next;
        }
        Ok(Btf::index(strings, types, typedefs))
    }

    /// The parsed types with their names looked up: structs and enums by name (the first of
    /// a name), typedefs by name (from `typedefs`, name offset to type id).
    fn index(strings: Vec<u8>, types: Vec<Type>, typedefs: HashMap<u32, u32>) -> Btf {
        let mut btf = Btf {
            strings,
            types,
            structs: HashMap::new(),
            typedefs: HashMap::new(),
            enums: HashMap::new(),
        };
        let (mut structs, mut enums) = (HashMap::new(), HashMap::new());
        for (id, t) in btf.types.iter().enumerate() {
            let names = match t.kind {
                KIND_STRUCT => &mut structs,
                KIND_ENUM => &mut enums,
                _ => continue,
            };
            if t.name != 0 {
                let name = btf.string(t.name).to_string();
                names.entry(name).or_insert(id as u32);
            }
        }
        (btf.structs, btf.enums) = (structs, enums);
        btf.typedefs = typedefs
            .into_iter()
            .map(|(name, id)| (btf.string(name).to_string(), id))
            .collect();
        btf
    }

    /// Reads the running kernel's BTF.
    pub fn from_sys() -> Result<Btf, String> {
        let path = "/sys/kernel/btf/vmlinux";
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        Btf::parse(&bytes).map_err(|e| format!("{path}: {e}"))
    }

    fn string(&self, off: u32) -> &str {
        let s = &self.strings[(off as usize).min(self.strings.len())..];
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.refers
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// How many arguments a BTF tracepoint hands its programs (its `btf_trace_NAME`
    /// prototype's parameters but the first, the context); None when it has no such type.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let id = *self.typedefs.get(&format!("btf_trace_{name}"))?;
        let ptr = self.resolve(id)?;
        if ptr.kind != KIND_PTR {
            return None;
        }
        let proto = self.resolve(ptr.refers)?;
        (proto.kind == KIND_FUNC_PROTO).then(|| proto.params.saturating_sub(1))
    }

    /// The byte offset of `path` (`"__tw_common.skc_dport"`) inside struct `name`, looking
    /// through anonymous unions and structs.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        let mut ty = &self.types[id as usize];
        let mut bits = 0u32;
        for part in path.split('.') {
            let (off, member_ty) = self
                .find(ty, part)
                .ok_or_else(|| BtfError::NoMember(name.to_string(), path.to_string()))?;
            bits += off;
            ty = self
                .resolve(member_ty)
                .ok_or_else(|| BtfError::NoMember(name.to_string(), path.to_string()))?;
        }
        Ok(bits / 8)
    }

    /// The enumerators of `enum name` with their values, in declaration order.
    pub fn enumerators(&self, name: &str) -> Result<Vec<(String, u32)>, BtfError> {
        let id = *self
            .enums
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(format!("enum {name}")))?;
        Ok(self.types[id as usize]
            .members
            .iter()
            .map(|m| (self.string(m.name).to_string(), m.ty))
            .collect())
    }

    /// The value of enumerator `constant` of `enum name`.
    pub fn enumerator(&self, name: &str, constant: &str) -> Result<u32, BtfError> {
        self.enumerators(name)?
            .into_iter()
            .find(|(n, _)| n == constant)
            .map(|(_, v)| v)
            .ok_or_else(|| BtfError::NoMember(format!("enum {name}"), constant.to_string()))
    }

    /// A member by name in a struct or union, descending into anonymous members; returns its
    /// bit offset and type.
    fn find(&self, ty: &Type, name: &str) -> Option<(u32, u32)> {
        for m in &ty.members {
            if m.name != 0 && self.string(m.name) == name {
                return Some((m.bit_offset, m.ty));
            }
        }
        for m in ty.members.iter().filter(|m| m.name == 0) {
            let inner = self.resolve(m.ty)?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some((off, t)) = self.find(inner, name)
            {
                return Some((m.bit_offset + off, t));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: `struct outer { int a; union { int b; struct { short c; short d; }; }; }`
    /// and `enum colour { RED = 1, BLUE = 7 }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0d\0short\0colour\0RED\0BLUE\0".to_vec();
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types: Vec<u8> = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        push(&[s("int"), info(KIND_INT, 0), 4, 32]); // 1: int
        push(&[s("short"), info(KIND_INT, 0), 2, 16]); // 2: short
        push(&[0, info(KIND_STRUCT, 2), 4, s("c"), 2, 0, s("d"), 2, 16]); // 3: struct { c; d; }
        push(&[0, info(KIND_UNION, 2), 4, s("b"), 1, 0, 0, 3, 0]); // 4: union { b; struct }
        push(&[0, info(KIND_CONST, 0), 4]); // 5: const union
        push(&[s("outer"), info(KIND_STRUCT, 2), 8, s("a"), 1, 0, 0, 5, 32]); // 6: outer
        push(&[
            s("colour"),
            info(KIND_ENUM, 2),
            4,
            s("RED"),
            1,
            s("BLUE"),
            7,
        ]); // 7: colour
        let mut b = Vec::new();
        for w in [
            0xeb9f_u32 | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        b.extend_from_slice(&types);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn offsets_through_anonymous_members_and_qualifiers() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.offset("outer", "b").unwrap(), 4);
        assert_eq!(btf.offset("outer", "c").unwrap(), 4);
        assert_eq!(btf.offset("outer", "d").unwrap(), 6);
        assert!(matches!(
            btf.offset("outer", "e"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.offset("nope", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn enumerators_by_name() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(
            btf.enumerators("colour").unwrap(),
            [("RED".to_string(), 1), ("BLUE".to_string(), 7)]
        );
        assert_eq!(btf.enumerator("colour", "BLUE").unwrap(), 7);
        assert!(btf.enumerator("colour", "GREEN").is_err());
        assert!(btf.enumerators("outer").is_err(), "a struct is no enum");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(Btf::parse(b"hello"), Err(BtfError::Magic)));
        let mut b = blob();
        b.truncate(30);
        assert!(Btf::parse(&b).is_err());
    }

    /// The BTF tracepoints' prototypes, as the kernel declares them: the counts the loader
    /// relies on (`tcp_send_reset` has its `reason` from Linux 6.10 on).
    #[test]
    fn the_running_kernels_tracepoint_arguments() {
        let Ok(btf) = Btf::from_sys() else {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIPPED: no /sys/kernel/btf/vmlinux");
            return;
        };
        assert_eq!(btf.tracepoint_args("inet_sock_set_state"), Some(3));
        assert_eq!(btf.tracepoint_args("tcp_receive_reset"), Some(1));
        assert_eq!(btf.tracepoint_args("timer_cancel"), Some(1));
        let send = btf.tracepoint_args("tcp_send_reset").unwrap();
        assert!((1..=3).contains(&send), "{send}");
        assert_eq!(btf.tracepoint_args("no_such_tracepoint"), None);
    }

    /// On the running kernel (no root needed to read it): the offsets the notes measured on
    /// this machine's kernel, as a cross-check of the reader, when its BTF is present.
    #[test]
    fn the_running_kernels_timewait_sock() {
        let Ok(btf) = Btf::from_sys() else {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIPPED: no /sys/kernel/btf/vmlinux");
            return;
        };
        let common = btf.offset("inet_timewait_sock", "__tw_common").unwrap();
        let dport = btf
            .offset("inet_timewait_sock", "__tw_common.skc_dport")
            .unwrap();
        let num = btf
            .offset("inet_timewait_sock", "__tw_common.skc_num")
            .unwrap();
        let timer = btf.offset("inet_timewait_sock", "tw_timer").unwrap();
        assert_eq!(common, 0);
        assert_eq!(num, dport + 2, "skc_num follows skc_dport in the port pair");
        assert!(timer > num, "the timer comes after the common part");
    }
}
