//! Strict protobuf decoding: prost skips unknown fields, but a signed job must mean exactly what
//! its signer saw, so before decoding, the payload's wire format is walked against the message
//! descriptors compiled into the agent. Unknown field numbers, wrong wire types, groups,
//! truncated fields, invalid UTF-8 strings and trailing bytes are all errors, and nesting is
//! bounded (RUSTSEC-2020-0002).

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};
use std::collections::HashMap;

const MAX_DEPTH: usize = 16;

/// Message descriptors by fully-qualified name (".patchagent.v1.Job").
pub struct Schema {
    messages: HashMap<String, DescriptorProto>,
}

impl Schema {
    pub fn new(encoded_fds: &[u8]) -> Result<Self, String> {
        let fds = FileDescriptorSet::decode(encoded_fds).map_err(|e| e.to_string())?;
        let mut messages = HashMap::new();
        fn add(prefix: &str, m: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
            let name = format!("{prefix}.{}", m.name());
            for nested in &m.nested_type {
                add(&name, nested, out);
            }
            out.insert(name, m.clone());
        }
        for file in &fds.file {
            let prefix = if file.package().is_empty() {
                String::new()
            } else {
                format!(".{}", file.package())
            };
            for m in &file.message_type {
                add(&prefix, m, &mut messages);
            }
        }
        Ok(Self { messages })
    }

    /// Checks that `bytes` is a well-formed `type_name` with only known fields.
    pub fn check(&self, type_name: &str, bytes: &[u8]) -> Result<(), String> {
        self.walk(type_name, bytes, 0)
    }

    fn walk(&self, type_name: &str, mut buf: &[u8], depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("message nested too deeply".into());
        }
        let msg = self
            .messages
            .get(type_name)
            .ok_or_else(|| format!("unknown message type {type_name}"))?;
        let short = type_name.rsplit('.').next().unwrap_or(type_name);
        while !buf.is_empty() {
            let key = varint(&mut buf).ok_or_else(|| format!("{short}: truncated field key"))?;
            let number = i32::try_from(key >> 3)
                .map_err(|_| format!("{short}: field number out of range"))?;
            let wire = key & 7;
            let field = msg
                .field
                .iter()
                .find(|f| f.number() == number)
                .ok_or_else(|| format!("{short}: unknown field {number}"))?;
            let ty = field.r#type();
            let repeated = field.label() == prost_types::field_descriptor_proto::Label::Repeated;
            match wire {
                0 => {
                    if !is_varint(ty) {
                        return Err(format!("{short}.{}: wrong wire type", field.name()));
                    }
                    varint(&mut buf)
                        .ok_or_else(|| format!("{short}.{}: truncated varint", field.name()))?;
                }
                1 | 5 => {
                    let (width, ok) = if wire == 1 {
                        (
                            8,
                            matches!(ty, Type::Fixed64 | Type::Sfixed64 | Type::Double),
                        )
                    } else {
                        (
                            4,
                            matches!(ty, Type::Fixed32 | Type::Sfixed32 | Type::Float),
                        )
                    };
                    if !ok || buf.len() < width {
                        return Err(format!(
                            "{short}.{}: wrong wire type or truncated",
                            field.name()
                        ));
                    }
                    buf = &buf[width..];
                }
                2 => {
                    let len = varint(&mut buf)
                        .and_then(|l| usize::try_from(l).ok())
                        .filter(|&l| l <= buf.len())
                        .ok_or_else(|| {
                            format!("{short}.{}: truncated length-delimited field", field.name())
                        })?;
                    let (value, rest) = buf.split_at(len);
                    buf = rest;
                    match ty {
                        Type::Message => self.walk(field.type_name(), value, depth + 1)?,
                        Type::String => {
                            std::str::from_utf8(value)
                                .map_err(|_| format!("{short}.{}: invalid UTF-8", field.name()))?;
                        }
                        Type::Bytes => {}
                        t if repeated && (is_varint(t) || is_fixed(t)) => {
                            // Packed repeated scalars.
                            let mut v = value;
                            while !v.is_empty() {
                                if is_varint(t) {
                                    varint(&mut v).ok_or_else(|| {
                                        format!("{short}.{}: bad packed value", field.name())
                                    })?;
                                } else {
                                    let w = if matches!(
                                        t,
                                        Type::Fixed64 | Type::Sfixed64 | Type::Double
                                    ) {
                                        8
                                    } else {
                                        4
                                    };
                                    v = v.get(w..).ok_or_else(|| {
                                        format!("{short}.{}: bad packed value", field.name())
                                    })?;
                                }
                            }
                        }
                        _ => return Err(format!("{short}.{}: wrong wire type", field.name())),
                    }
                }
                _ => return Err(format!("{short}: unsupported wire type {wire}")),
            }
        }
        Ok(())
    }
}

fn is_varint(t: Type) -> bool {
    matches!(
        t,
        Type::Int32
            | Type::Int64
            | Type::Uint32
            | Type::Uint64
            | Type::Sint32
            | Type::Sint64
            | Type::Bool
            | Type::Enum
    )
}

fn is_fixed(t: Type) -> bool {
    matches!(
        t,
        Type::Fixed32
            | Type::Sfixed32
            | Type::Float
            | Type::Fixed64
            | Type::Sfixed64
            | Type::Double
    )
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1 as pb;

    fn schema() -> Schema {
        Schema::new(crate::proto::FILE_DESCRIPTOR_SET).expect("schema")
    }

    fn job() -> Vec<u8> {
        pb::Job {
            job_id: "j1".into(),
            targets: vec!["h".into()],
            expires_at: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 0,
            }),
            action: Some(pb::job::Action::Upgrade(pb::UpgradeAction {
                scope: pb::UpgradeScope::Security as i32,
                exclude: vec!["a".into(), "/b.*/".into()],
                ..Default::default()
            })),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn accepts_what_prost_writes() {
        schema().check(".patchagent.v1.Job", &job()).expect("valid");
    }

    #[test]
    fn rejects_unknown_fields_trailing_bytes_and_truncation() {
        let s = schema();
        let mut unknown = job();
        unknown.extend_from_slice(&[0xa8, 0x06, 0x01]); // field 101, varint 1
        assert!(
            s.check(".patchagent.v1.Job", &unknown)
                .expect_err("unknown")
                .contains("unknown field 101")
        );
        let mut trailing = job();
        trailing.push(0x00);
        assert!(s.check(".patchagent.v1.Job", &trailing).is_err());
        let full = job();
        assert!(
            s.check(".patchagent.v1.Job", &full[..full.len() - 1])
                .is_err()
        );
        // An unknown field inside a nested message.
        let nested = pb::Job {
            job_id: "j".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut bad = nested.clone();
        bad.extend_from_slice(&[0x22, 0x02, 0x18, 0x01]); // expires_at { field 3 = 1 }
        assert!(
            s.check(".patchagent.v1.Job", &bad)
                .expect_err("nested")
                .contains("Timestamp: unknown field 3")
        );
    }

    #[test]
    fn never_panics_on_junk() {
        let s = schema();
        for seed in 0u32..3000 {
            let bytes: Vec<u8> = (0..(seed % 64))
                .map(|i| (seed.wrapping_mul(2654435761).rotate_left(i) >> 3) as u8)
                .collect();
            let _ = s.check(".patchagent.v1.Job", &bytes);
        }
        // Deep nesting is bounded.
        let mut deep = Vec::new();
        for _ in 0..100 {
            let mut outer = vec![0x22];
            outer.push(deep.len() as u8);
            outer.extend_from_slice(&deep);
            if outer.len() > 120 {
                break;
            }
            deep = outer;
        }
        let _ = s.check(".patchagent.v1.Job", &deep);
    }
}
