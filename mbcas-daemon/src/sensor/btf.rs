//! Struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF has no CO-RE relocations, so the loader looks up every field the
//! programs read here and passes the byte offsets in as globals. Only what that
//! needs is parsed: the type section (to walk structs and unions, including
//! anonymous members) and the string section.

use std::{borrow::Cow, collections::HashMap, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("BTF member {strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: u32,
    /// Size for ints/structs/unions, referenced type id for modifiers.
    size_or_type: u32,
    members: Vec<Member>,
}

/// A field's place and width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u64,
    /// Byte size of the field's type (after typedefs), when it is known.
    pub size: Option<u64>,
}

/// Parsed BTF: enough to find struct member offsets.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, u32>,
}

fn u16_at(d: &[u8], o: usize) -> Result<u16, BtfError> {
    d.get(o..o + 2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(d: &[u8], o: usize) -> Result<u32, BtfError> {
    d.get(o..o + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF (the machine's own).
    pub fn parse(d: &[u8]) -> Result<Self, BtfError> {
        if u16_at(d, 0)? != 0xeb9f {
            return Err(BtfError::Malformed(
                "bad magic (big-endian BTF is not supported)",
            ));
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let type_off = u32_at(d, 8)? as usize;
        let type_len = u32_at(d, 12)? as usize;
        let str_off = u32_at(d, 16)? as usize;
        let str_len = u32_at(d, 20)? as usize;
        let tstart = hdr_len + type_off;
        let tend = tstart + type_len;
        let sstart = hdr_len + str_off;
        let strings = d
            .get(sstart..sstart + str_len)
            .ok_or(BtfError::Malformed("string section"))?
            .to_vec();
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            size_or_type: 0,
            members: vec![],
        }];
        let mut p = tstart;
        while p < tend {
            let name = u32_at(d, p)?;
            let info = u32_at(d, p + 4)?;
            let size_or_type = u32_at(d, p + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            p += 12;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | 14 | 17 => 4,
                3 => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let q = p + 12 * i;
                        let off = u32_at(d, q + 8)?;
                        members.push(Member {
                            name: u32_at(d, q)?,
                            type_id: u32_at(d, q + 4)?,
                            bit_offset: if kind_flag { off & 0xff_ffff } else { off },
                            bitfield_size: if kind_flag { off >> 24 } else { 0 },
                        });
                    }
                    12 * vlen
                }
                6 | 13 => 8 * vlen,
                15 | 19 => 12 * vlen,
                2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12 | 16
                | KIND_TYPE_TAG => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            p += extra;
            types.push(Type {
                kind,
                name,
                size_or_type,
                members,
            });
        }
        let mut btf = Self {
            types,
            strings,
            by_name: HashMap::new(),
        };
        let mut by_name = HashMap::new();
        for (id, t) in btf.types.iter().enumerate() {
            if (t.kind == KIND_STRUCT || t.kind == KIND_UNION) && t.name != 0 {
                by_name
                    .entry(btf.string(t.name).into_owned())
                    .or_insert(id as u32);
            }
        }
        btf.by_name = by_name;
        Ok(btf)
    }

    fn string(&self, off: u32) -> Cow<'_, str> {
        let start = off as usize;
        let bytes = self.strings.get(start..).unwrap_or_default();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end])
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    fn find_in(&self, id: u32, member: &str, base_bits: u64, depth: u32) -> Option<(u64, &Member)> {
        let t = self.types.get(id as usize)?;
        for m in &t.members {
            let bits = base_bits + u64::from(m.bit_offset);
            if m.name != 0 && self.string(m.name) == member {
                return Some((bits, m));
            }
            if m.name == 0 && depth < 8 {
                let inner = self.resolve(m.type_id);
                if let Some(it) = self.types.get(inner as usize)
                    && (it.kind == KIND_STRUCT || it.kind == KIND_UNION)
                    && let Some(found) = self.find_in(inner, member, bits, depth + 1)
                {
                    return Some(found);
                }
            }
        }
        None
    }

    /// Whether `strukt.member` exists (feature detection).
    pub fn has_member(&self, strukt: &str, member: &str) -> bool {
        self.field(strukt, member).is_ok()
    }

    /// Byte offset and size of `strukt.member`, looking through anonymous members.
    pub fn field(&self, strukt: &str, member: &str) -> Result<Field, BtfError> {
        let id = *self
            .by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let (bits, m) = self
            .find_in(id, member, 0, 0)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.into(),
                member: member.into(),
            })?;
        if m.bitfield_size != 0 || bits % 8 != 0 {
            return Err(BtfError::Bitfield {
                strukt: strukt.into(),
                member: member.into(),
            });
        }
        let ty = self.types.get(self.resolve(m.type_id) as usize);
        let size = match ty {
            Some(t) if matches!(t.kind, KIND_INT | KIND_STRUCT | KIND_UNION) => {
                Some(u64::from(t.size_or_type))
            }
            Some(t) if t.kind == 2 => Some(8),
            _ => None,
        };
        Ok(Field {
            offset: bits / 8,
            size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `struct s { int a; struct { long b; }; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0int\0long\0".to_vec();
        let mut types = Vec::new();
        let mut push = |v: &[u32]| {
            for x in v {
                types.extend_from_slice(&x.to_le_bytes());
            }
        };
        // 1: int (name "int" at 7), size 4, encoding word
        push(&[7, KIND_INT << 24, 4, 32]);
        // 2: long (name at 11), size 8
        push(&[11, KIND_INT << 24, 8, 64]);
        // 3: anonymous struct { long b @0 }
        push(&[0, (KIND_STRUCT << 24) | 1, 8, 5, 2, 0]);
        // 4: struct s { int a @0; anon @64 bits }
        push(&[1, (KIND_STRUCT << 24) | 2, 16, 3, 1, 0, 0, 3, 64]);
        let mut d = Vec::new();
        for v in [0xeb9f_u16.to_le_bytes().to_vec(), vec![1, 0]] {
            d.extend(v);
        }
        for x in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            d.extend_from_slice(&x.to_le_bytes());
        }
        d.extend(types);
        d.extend(strings);
        d
    }

    #[test]
    fn finds_members_through_anonymous_structs() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(
            btf.field("s", "a").ok(),
            Some(Field {
                offset: 0,
                size: Some(4)
            })
        );
        assert_eq!(
            btf.field("s", "b").ok(),
            Some(Field {
                offset: 8,
                size: Some(8)
            })
        );
        assert!(matches!(
            btf.field("s", "c"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(btf.field("t", "a"), Err(BtfError::NoStruct(_))));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Btf::parse(b"not btf").is_err());
        let mut d = blob();
        d.truncate(30);
        assert!(Btf::parse(&d).is_err());
    }

    #[test]
    fn running_kernel_has_the_fields_the_programs_read() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI machine has no BTF at {}",
                path.display()
            );
            eprintln!("SKIP: no kernel BTF at {}", path.display());
            return;
        }
        let btf = Btf::from_file(path).unwrap();
        for (s, m) in [
            ("hrtimer", "function"),
            ("cfs_bandwidth", "period_timer"),
            ("cfs_bandwidth", "nr_periods"),
            ("cfs_bandwidth", "throttled_time"),
            ("task_group", "cfs_bandwidth"),
            ("cgroup", "kn"),
            ("kernfs_node", "id"),
            ("task_struct", "pid"),
        ] {
            assert!(btf.has_member(s, m), "{s}.{m}");
        }
        assert_eq!(
            btf.field("kernfs_node", "id").ok().and_then(|f| f.size),
            Some(8)
        );
    }
}
