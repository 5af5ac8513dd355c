//! One function per fuzz target. Each panics (the fuzzer's "crash") when an invariant of its
//! parser does not hold; the module documentation of the crate lists the invariants.

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use cpr_proto::state::{self, SectionId, StateError, StateFormats, StateWriter};
use cpr_proto::wire::{self, WireError};
use cprd::engine::VmRecord;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{allocations_of, assert_error_text, assert_within};

/// Gives a candidate state stream the length field and CRC it would have if a VMM had written
/// it, so that the fuzzer explores the sections behind them and not only the checksum check.
pub fn seal_state(bytes: &mut [u8]) {
    if bytes.len() < 32 {
        return;
    }
    let total = bytes.len() as u64;
    bytes[16..24].copy_from_slice(&total.to_le_bytes());
    let body = bytes.len() - 8;
    let crc = state::checksum(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
}

/// The state stream on the `main` channel, as a new VMM reads it: [`state::read_stream`] from
/// the socket, [`state::decode`], then each section's typed payload. The first byte picks
/// whether the rest is taken as it is (odd) or sealed first ([`seal_state`], even).
pub fn state_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if mode & 1 == 0 {
        seal_state(&mut bytes);
    }
    let limit = usize::try_from(state::MAX_STATE_BYTES).unwrap_or(usize::MAX);
    let (read, usage) = allocations_of(|| state::read_stream(&mut Cursor::new(&bytes)));
    assert_within("read_stream", usage, limit + 4096);
    let (decoded, usage) = allocations_of(|| state::decode(&bytes));
    assert_within("decode", usage, 2 * bytes.len() + 4096);
    match (&read, &decoded) {
        (Ok(stream), Ok(_)) => assert_eq!(stream[..], bytes[..stream.len()], "read_stream changed the bytes"),
        (Err(e), _) => assert_error_text("read_stream", &e.to_string()),
        (Ok(_), Err(_)) => {}
    }
    let parsed = match decoded {
        Ok(parsed) => parsed,
        Err(e) => {
            assert_error_text("decode", &e.to_string());
            return;
        }
    };
    assert!(state::READS_FORMATS.contains(&parsed.major), "accepted format {}", parsed.major);
    for section in &parsed.sections {
        assert!((1..=section.id.max_version()).contains(&section.version), "accepted {section:?}");
    }
    // Encode the sections again: the same sections come back.
    let mut writer = StateWriter::new(parsed.major, parsed.minor);
    for s in &parsed.sections {
        writer.add_raw(s.id.code(), s.version, s.mandatory, &s.payload);
    }
    let again = state::decode(&writer.finish()).expect("a re-encoded stream decodes");
    assert_eq!(again.sections, parsed.sections, "decode -> encode -> decode changed the sections");
    for section in &parsed.sections {
        let stable = match section.id {
            SectionId::Machine => section_round_trip::<state::MachineState>(section),
            SectionId::Vm => section_round_trip::<state::VmState>(section),
            SectionId::Vcpu => section_round_trip::<state::VcpuState>(section),
            SectionId::Serial => section_round_trip::<state::SerialState>(section),
            SectionId::I8042 => section_round_trip::<state::I8042State>(section),
            SectionId::Timing => section_round_trip::<state::Timing>(section),
            SectionId::Unknown(_) => Ok(()),
        };
        match stable {
            Ok(()) => {}
            Err(StateError::BadSection { reason, .. }) => assert_error_text("section", &reason),
            Err(other) => panic!("a section payload failed with {other:?}, not BadSection"),
        }
    }
}

/// The most a section's decoding may allocate beyond 4× its payload: serde preallocates at most
/// 1 MiB for a sequence whose length it has not read the bytes of yet (`size_hint::cautious`),
/// two nested sequences deep, well inside `MAX_STATE_BYTES`.
pub const SEQUENCE_PREALLOCATION_BOUND: usize = 2 * 1024 * 1024 + 64 * 1024;

/// A section's typed payload: decode → encode → decode → encode gives the same bytes twice.
fn section_round_trip<T: Serialize + DeserializeOwned>(section: &state::Section) -> Result<(), StateError> {
    let (value, usage) = allocations_of(|| section.decode::<T>());
    // A sequence's declared length is believed up to serde's cautious preallocation (1 MiB per
    // sequence) before its bytes are read; the section types nest sequences two deep at most.
    assert_within("section payload", usage, 4 * section.payload.len() + SEQUENCE_PREALLOCATION_BOUND);
    let first = postcard::to_allocvec(&value?).expect("a decoded section encodes");
    let again: T = postcard::from_bytes(&first).expect("an encoded section decodes");
    let second = postcard::to_allocvec(&again).expect("a decoded section encodes");
    assert_eq!(first, second, "section payload is not stable under decode -> encode");
    Ok(())
}

/// The most heap a message may take while it decodes, per byte of message (measured: 25 for
/// arrays of one-digit numbers, serde's buffered tree of an internally tagged enum).
pub const MESSAGE_HEAP_PER_BYTE: usize = 32;

/// One message on a control, cpr or commit socket, as [`wire::recv`] decodes it; the first
/// byte picks which of the seven message types the receiver expects.
pub fn wire_message(data: &[u8]) {
    use cpr_proto::{control, cpr};
    let Some((&kind, body)) = data.split_first() else { return };
    match kind % 7 {
        0 => message_round_trip::<control::Request>(body),
        1 => message_round_trip::<control::Response>(body),
        2 => message_round_trip::<cpr::Hello>(body),
        3 => message_round_trip::<cpr::ToNew>(body),
        4 => message_round_trip::<cpr::ToOld>(body),
        5 => message_round_trip::<cpr::ToArbiter>(body),
        _ => message_round_trip::<cpr::FromArbiter>(body),
    }
}

fn message_round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(body: &[u8]) {
    let (decoded, usage) = allocations_of(|| wire::decode::<T>(body));
    // No single allocation beyond the message limit; the live heap while decoding is bounded by
    // the message's size: the internally tagged enums of the protocol (`"msg": ...`) make serde
    // buffer the message as a tree first (about 25 bytes per JSON number; see docs/fuzzing.md).
    assert!(usage.largest <= wire::MAX_MESSAGE_BYTES, "wire::decode: one allocation of {} bytes", usage.largest);
    assert_within("wire::decode", usage, MESSAGE_HEAP_PER_BYTE * body.len() + 64 * 1024);
    match decoded {
        Ok(msg) => {
            let bytes = wire::encode(&msg).expect("a decoded message encodes");
            let again: T = wire::decode(&bytes).expect("an encoded message decodes");
            assert_eq!(again, msg, "decode -> encode -> decode changed the message");
        }
        Err(e @ (WireError::Malformed(_) | WireError::TooLarge)) => assert_error_text("wire", &e.to_string()),
        Err(other) => panic!("decoding bytes failed with {other:?}"),
    }
}

/// What QEMU says on a QMP connection, as cprd's client hears it: the greeting and capability
/// negotiation, then the commands a handoff sends, each answered from the rest of the bytes.
pub fn qmp_session(data: &[u8]) {
    use cpr_qemu::qmp::{Qmp, QmpError};
    let data = &data[..data.len().min(64 * 1024)];
    let Ok((ours, mut qemu)) = UnixStream::pair() else { return };
    if qemu.write_all(data).is_err() || qemu.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let (outcome, usage) = allocations_of(|| -> Result<usize, QmpError> {
        let mut qmp = Qmp::negotiate(ours, Duration::from_secs(5))?;
        qmp.status()?;
        qmp.execute("query-migrate", None)?;
        qmp.execute("stop", None)?;
        qmp.execute("cont", None)?;
        Ok(qmp.take_events().len())
    });
    assert_within("qmp", usage, 4 * cpr_qemu::qmp::MAX_MESSAGE);
    match outcome {
        Ok(events) => assert!(events <= data.iter().filter(|b| **b == b'\n').count()),
        Err(QmpError::Timeout(what)) => panic!("QMP waited for {what} on a connection that had ended"),
        Err(e) => assert_error_text("qmp", &e.to_string()),
    }
}

/// A VM definition `vms/NAME.toml`, as cprd loads it.
pub fn vm_definition(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = Path::new("/etc/cprd/vms/fuzz-vm.toml");
    match cprd::config::parse_vm(file, text) {
        Ok(def) => {
            assert_eq!(def.name, "fuzz-vm");
            assert!(def.vcpus >= 1, "{def:?}");
            let bytes = def.memory_bytes;
            assert!(
                (cpr_proto::memory::MIN_MEMORY_BYTES..=cpr_proto::memory::MAX_MEMORY_BYTES).contains(&bytes),
                "memory {bytes} accepted"
            );
            assert!(!def.machine.contains(','), "machine {:?} accepted", def.machine);
        }
        Err(e) => {
            assert_eq!(e.file, file, "the error names another file");
            assert!(!e.message.is_empty());
        }
    }
}

/// `cprd.toml`, as cprd loads it.
pub fn settings(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let dir = Path::new("/etc/cprd");
    match cprd::config::settings_from_text(dir, text) {
        Ok(s) => {
            assert!((100..=600_000).contains(&s.handoff_timeout_ms), "{s:?}");
            assert_eq!(s.vms_dir, dir.join("vms"));
        }
        Err(e) => {
            assert_eq!(e.file, dir.join("cprd.toml"), "the error names another file");
            assert!(!e.message.is_empty());
        }
    }
}

/// A runtime record `/run/cprd/vms/NAME.json` left by an earlier cprd.
pub fn runtime_record(data: &[u8]) {
    let (parsed, usage) = allocations_of(|| serde_json::from_slice::<VmRecord>(data));
    assert_within("runtime record", usage, 16 * data.len() + 64 * 1024);
    let Ok(record) = parsed else { return };
    let _ = record.check_format();
    let again: VmRecord = serde_json::from_slice(&serde_json::to_vec(&record).expect("encodes")).expect("decodes");
    assert_eq!(again, record, "decode -> encode -> decode changed the record");
}

/// The fd store's state record: every VM's record, as a cprd restarting under systemd reads it.
pub fn fdstore_state(data: &[u8]) {
    let (parsed, usage) = allocations_of(|| serde_json::from_slice::<BTreeMap<String, VmRecord>>(data));
    assert_within("fd-store state record", usage, 16 * data.len() + 64 * 1024);
    let Ok(records) = parsed else { return };
    let bytes = serde_json::to_vec(&records).expect("encodes");
    let again: BTreeMap<String, VmRecord> = serde_json::from_slice(&bytes).expect("decodes");
    assert_eq!(again, records, "decode -> encode -> decode changed the records");
}

/// What a candidate VMM binary prints for `--state-formats`, as cprd's pre-flight parses it.
pub fn state_formats(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match StateFormats::parse(&text) {
        Ok(formats) => {
            let again = StateFormats::parse(&formats.render()).expect("a rendered answer parses");
            assert_eq!(again, formats, "parse -> render -> parse changed the answer");
        }
        Err(e) => assert_error_text("state formats", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worst case of the heap bound: a `resources` message near the size limit made of
    /// one-digit numbers, each a node of serde's buffered tree.
    #[test]
    fn the_largest_message_of_numbers_stays_within_the_heap_bound() {
        let row = format!("[{}]", vec!["0"; 40].join(","));
        let rows = vec![row; (wire::MAX_MESSAGE_BYTES - 200) / 82];
        let body = format!(
            "{{\"msg\":\"resources\",\"fd_names\":[\"ram\"],\"memory_bytes\":67108864,\"vcpus\":1,\"cpuid\":[{}],\"generation\":1,\"guest\":\"TestGuest\"}}",
            rows.join(",")
        );
        assert!(body.len() <= wire::MAX_MESSAGE_BYTES && body.len() > wire::MAX_MESSAGE_BYTES - 4096);
        let (decoded, usage) = allocations_of(|| wire::decode::<cpr_proto::cpr::ToNew>(body.as_bytes()));
        let per_byte = usage.peak / body.len();
        assert!(decoded.is_ok(), "{decoded:?}");
        eprintln!("{per_byte} bytes of heap per byte of a {}-byte message: {usage:?}", body.len());
        assert!(usage.largest <= wire::MAX_MESSAGE_BYTES, "{usage:?}");
        assert!(
            per_byte < MESSAGE_HEAP_PER_BYTE,
            "{per_byte} bytes of heap per byte of message ({usage:?}, {decoded:?})"
        );
    }
}
