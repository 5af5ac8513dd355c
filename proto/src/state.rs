//! The VM-state format carried on the `main` channel: a versioned envelope of typed sections.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CPRSTATE"
//!      8     2  format major (little endian)      a reader accepts majors it lists in READS_FORMATS
//!     10     2  format minor                      minors only add optional sections or fields
//!     12     4  section count
//!     16     8  total length of the stream, CRC included
//!     24     …  sections: id u16, version u16, flags u32 (bit 0: mandatory), length u32, payload
//!    end-8   8  CRC-64/XZ over every byte before it
//! ```
//! The format version is independent of the package version. Section payloads are postcard
//! (serde) encodings of the plain-data structs below; the KVM structs inside them travel as the
//! kernel's own byte layout. A reader rejects: a wrong magic, a newer major, a stream over
//! [`MAX_STATE_BYTES`], a bad CRC, a truncated section, an unknown mandatory section, and a known
//! mandatory section of a newer version than it reads. Unknown optional sections are skipped and
//! reported.

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Magic at the start of every state stream.
pub const MAGIC: [u8; 8] = *b"CPRSTATE";
/// The major format version this build writes.
pub const FORMAT_MAJOR: u16 = 1;
/// The minor format version this build writes.
pub const FORMAT_MINOR: u16 = 0;
/// Major format versions this build reads.
pub const READS_FORMATS: &[u16] = &[1];
/// What a cpr-vmm binary says about state formats when asked (`cpr-vmm --state-formats`): the
/// version it writes and the majors it reads. Printed by the VMM and parsed by cprd's pre-flight,
/// which hands a guest over only when the candidate reads the major the running VMM writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFormats {
    /// The `(major, minor)` it writes.
    pub writes: (u16, u16),
    /// The majors it reads.
    pub reads: Vec<u16>,
}

impl StateFormats {
    /// This build's.
    pub fn this_build() -> Self {
        Self { writes: (FORMAT_MAJOR, FORMAT_MINOR), reads: READS_FORMATS.to_vec() }
    }

    /// The answer's text: `writes: M.m` and `reads: M [M...]`, one line each.
    pub fn render(&self) -> String {
        let reads: Vec<String> = self.reads.iter().map(u16::to_string).collect();
        format!("writes: {}.{}\nreads: {}\n", self.writes.0, self.writes.1, reads.join(" "))
    }

    /// Parses an answer (lines other than `writes:` and `reads:` are ignored).
    pub fn parse(text: &str) -> Result<Self, String> {
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let writes = field("writes: ")
            .and_then(|w| w.split_once('.'))
            .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)))
            .ok_or("no `writes: MAJOR.MINOR` line")?;
        let reads = field("reads: ")
            .map(|r| r.split_whitespace().map(str::parse).collect::<Result<Vec<u16>, _>>())
            .ok_or("no `reads:` line")?
            .map_err(|e| format!("bad `reads:` line: {e}"))?;
        Ok(Self { writes, reads })
    }
}

/// Largest state stream accepted (a guard against a corrupt length field, as Firecracker's 10 MB).
pub const MAX_STATE_BYTES: u64 = 16 << 20;

const HEADER_BYTES: usize = 24;
const SECTION_HEADER_BYTES: usize = 12;
const CRC_BYTES: usize = 8;
const FLAG_MANDATORY: u32 = 1;

/// The stream's checksum: CRC-64/XZ (ECMA-182, reflected, as `xz` computes it).
///
/// Computed with carry-less multiplication (`crc64fast`), not a table: the switchover runs this
/// once per process, on cold caches, and a 32 KiB slice-by-16 table took about 30 µs of each
/// side's downtime to fetch (ftrace of a 1-vCPU handoff: 39 µs encode, 34 µs decode, against 4
/// and 3 µs hot). Same values as before: the golden file still reads.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut digest = crc64fast::Digest::new();
    digest.write(bytes);
    digest.sum64()
}

/// Section identifiers. Numbers are part of the format: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionId {
    /// [`MachineState`]: RAM size, vCPU count, generation, guest kind.
    Machine,
    /// [`VmState`]: kvmclock, PIC, IOAPIC, PIT.
    Vm,
    /// [`VcpuState`], one section per vCPU.
    Vcpu,
    /// [`SerialState`] of the 8250 UART on 0x3f8.
    Serial,
    /// [`I8042State`] of the keyboard controller.
    I8042,
    /// [`Timing`]: when the pause was requested (optional, for downtime measurement).
    Timing,
    /// An id this build does not know.
    Unknown(u16),
}

impl SectionId {
    /// The number written to the stream.
    pub fn code(self) -> u16 {
        match self {
            Self::Machine => 1,
            Self::Vm => 2,
            Self::Vcpu => 3,
            Self::Serial => 4,
            Self::I8042 => 5,
            Self::Timing => 6,
            Self::Unknown(c) => c,
        }
    }

    /// The id for a number read from a stream.
    pub fn from_code(code: u16) -> Self {
        match code {
            1 => Self::Machine,
            2 => Self::Vm,
            3 => Self::Vcpu,
            4 => Self::Serial,
            5 => Self::I8042,
            6 => Self::Timing,
            c => Self::Unknown(c),
        }
    }

    /// The newest version of this section this build reads (0 for unknown ids).
    pub fn max_version(self) -> u16 {
        match self {
            Self::Unknown(_) => 0,
            _ => 1,
        }
    }
}

/// Why a state stream was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The stream does not start with [`MAGIC`].
    #[error("not a cpr state stream (bad magic)")]
    BadMagic,
    /// The stream's major version is not one this build reads.
    #[error("state format {major}.{minor} is not readable by this build (reads major versions {reads:?})")]
    UnsupportedFormat {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
        /// What this build reads.
        reads: Vec<u16>,
    },
    /// The declared length is outside the accepted range.
    #[error("state stream declares {0} bytes, outside the accepted range (at most {MAX_STATE_BYTES})")]
    BadLength(u64),
    /// The stream ended early.
    #[error("state stream truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes expected.
        expected: u64,
        /// Bytes available.
        got: u64,
    },
    /// The checksum does not match the content.
    #[error("state stream checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    BadCrc {
        /// CRC in the stream.
        stored: u64,
        /// CRC of the content.
        computed: u64,
    },
    /// A section header or payload runs past the end.
    #[error("section {index} is malformed: {reason}")]
    BadSection {
        /// Position of the section in the stream.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// A mandatory section this build does not understand.
    #[error("mandatory section id {id} version {version} is not understood by this build")]
    UnknownMandatory {
        /// Section id.
        id: u16,
        /// Section version.
        version: u16,
    },
    /// A required section is absent.
    #[error("required section {0:?} is missing")]
    Missing(SectionId),
    /// Reading the stream failed.
    #[error("cannot read the state stream: {0}")]
    Io(String),
}

/// One section as read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Its id.
    pub id: SectionId,
    /// Its version.
    pub version: u16,
    /// Whether a reader must understand it.
    pub mandatory: bool,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Section {
    /// Decodes the payload as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StateError> {
        postcard::from_bytes(&self.payload).map_err(|e| StateError::BadSection {
            index: 0,
            reason: format!("{:?} payload does not decode: {e}", self.id),
        })
    }
}

/// A checked state stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedState {
    /// Format major.
    pub major: u16,
    /// Format minor.
    pub minor: u16,
    /// The sections this build understands, in stream order.
    pub sections: Vec<Section>,
    /// Optional sections that were skipped as unknown: (id, version).
    pub skipped: Vec<(u16, u16)>,
}

impl ParsedState {
    /// The first section with `id`.
    pub fn first(&self, id: SectionId) -> Result<&Section, StateError> {
        self.sections.iter().find(|s| s.id == id).ok_or(StateError::Missing(id))
    }

    /// Every section with `id`, in order.
    pub fn all(&self, id: SectionId) -> impl Iterator<Item = &Section> {
        self.sections.iter().filter(move |s| s.id == id)
    }
}

/// Builds a state stream section by section.
#[derive(Debug)]
pub struct StateWriter {
    buf: Vec<u8>,
    count: u32,
}

impl Default for StateWriter {
    fn default() -> Self {
        Self::new(FORMAT_MAJOR, FORMAT_MINOR)
    }
}

impl StateWriter {
    /// A writer for a given format version (tests write other versions on purpose).
    pub fn new(major: u16, minor: u16) -> Self {
        Self::reusing(Vec::with_capacity(64 * 1024), major, minor)
    }

    /// A writer into `buf`, emptied first and its capacity kept: a buffer already written once
    /// (the old VMM's warm-up) has its pages in place, so the switchover's encode takes no page
    /// fault and grows no heap.
    pub fn reusing(mut buf: Vec<u8>, major: u16, minor: u16) -> Self {
        buf.clear();
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&major.to_le_bytes());
        buf.extend_from_slice(&minor.to_le_bytes());
        buf.extend_from_slice(&[0u8; 12]);
        Self { buf, count: 0 }
    }

    /// Appends a section with a serde-encoded payload, encoded in place.
    pub fn add<T: Serialize>(&mut self, id: SectionId, version: u16, mandatory: bool, value: &T) -> &mut Self {
        let header_at = self.buf.len();
        self.add_raw(id.code(), version, mandatory, &[]);
        let payload_at = self.buf.len();
        // postcard into a Vec cannot fail for the plain-data types of this module; if it did,
        // the section is left with an empty payload, which a reader refuses.
        if postcard::to_io(value, &mut self.buf).is_err() {
            self.buf.truncate(payload_at);
        }
        let len = u32::try_from(self.buf.len() - payload_at).unwrap_or(u32::MAX);
        self.buf[header_at + 8..header_at + 12].copy_from_slice(&len.to_le_bytes());
        self
    }

    /// Appends a section with a raw payload.
    pub fn add_raw(&mut self, id: u16, version: u16, mandatory: bool, payload: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&id.to_le_bytes());
        self.buf.extend_from_slice(&version.to_le_bytes());
        let flags = if mandatory { FLAG_MANDATORY } else { 0 };
        self.buf.extend_from_slice(&flags.to_le_bytes());
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.count += 1;
        self
    }

    /// Seals the stream: fills in the header and appends the CRC.
    pub fn finish(mut self) -> Vec<u8> {
        let total = (self.buf.len() + CRC_BYTES) as u64;
        self.buf[12..16].copy_from_slice(&self.count.to_le_bytes());
        self.buf[16..24].copy_from_slice(&total.to_le_bytes());
        let crc = checksum(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks the fixed header: magic, version, declared length. Returns the declared length.
fn check_header(head: &[u8]) -> Result<u64, StateError> {
    if head.len() < HEADER_BYTES {
        return Err(StateError::Truncated { expected: HEADER_BYTES as u64, got: head.len() as u64 });
    }
    if head[..8] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let (major, minor) = (le_u16(head, 8), le_u16(head, 10));
    if !READS_FORMATS.contains(&major) {
        return Err(StateError::UnsupportedFormat { major, minor, reads: READS_FORMATS.to_vec() });
    }
    let total = le_u64(head, 16);
    if total < (HEADER_BYTES + CRC_BYTES) as u64 || total > MAX_STATE_BYTES {
        return Err(StateError::BadLength(total));
    }
    Ok(total)
}

/// Reads exactly one state stream from `reader` (the `main` channel), checking the header first
/// so that a bad length is refused before anything large is read.
pub fn read_stream(reader: &mut impl Read) -> Result<Vec<u8>, StateError> {
    let mut buf = vec![0u8; HEADER_BYTES];
    read_full(reader, &mut buf, HEADER_BYTES as u64)?;
    let total = check_header(&buf)?;
    let total_usize = usize::try_from(total).map_err(|_| StateError::BadLength(total))?;
    buf.resize(total_usize, 0);
    read_full(reader, &mut buf[HEADER_BYTES..], total)?;
    Ok(buf)
}

fn read_full(reader: &mut impl Read, mut dst: &mut [u8], expected: u64) -> Result<(), StateError> {
    let want = dst.len();
    let mut got = 0usize;
    while !dst.is_empty() {
        match reader.read(dst) {
            Ok(0) => {
                let have = expected - (want - got) as u64;
                return Err(StateError::Truncated { expected, got: have });
            }
            Ok(n) => {
                got += n;
                dst = &mut dst[n..];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StateError::Io(e.to_string())),
        }
    }
    Ok(())
}

/// Checks and splits a complete state stream.
pub fn decode(bytes: &[u8]) -> Result<ParsedState, StateError> {
    let total = check_header(bytes)?;
    if (bytes.len() as u64) < total {
        return Err(StateError::Truncated { expected: total, got: bytes.len() as u64 });
    }
    let end = usize::try_from(total).map_err(|_| StateError::BadLength(total))?;
    let bytes = &bytes[..end];
    let body_end = end - CRC_BYTES;
    let stored = le_u64(bytes, body_end);
    let computed = checksum(&bytes[..body_end]);
    if stored != computed {
        return Err(StateError::BadCrc { stored, computed });
    }
    let count = le_u32(bytes, 12);
    let mut at = HEADER_BYTES;
    let mut parsed =
        ParsedState { major: le_u16(bytes, 8), minor: le_u16(bytes, 10), sections: Vec::new(), skipped: Vec::new() };
    for index in 0..count {
        if at + SECTION_HEADER_BYTES > body_end {
            return Err(StateError::BadSection { index, reason: "header runs past the end".into() });
        }
        let code = le_u16(bytes, at);
        let version = le_u16(bytes, at + 2);
        let mandatory = le_u32(bytes, at + 4) & FLAG_MANDATORY != 0;
        let len = le_u32(bytes, at + 8) as usize;
        at += SECTION_HEADER_BYTES;
        if at + len > body_end {
            return Err(StateError::BadSection { index, reason: format!("payload of {len} bytes runs past the end") });
        }
        let id = SectionId::from_code(code);
        if version == 0 || version > id.max_version() {
            if mandatory {
                return Err(StateError::UnknownMandatory { id: code, version });
            }
            parsed.skipped.push((code, version));
        } else {
            parsed.sections.push(Section { id, version, mandatory, payload: bytes[at..at + len].to_vec() });
        }
        at += len;
    }
    if at != body_end {
        return Err(StateError::BadSection { index: count, reason: "trailing bytes after the last section".into() });
    }
    Ok(parsed)
}

/// What kind of guest runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestKind {
    /// A Linux kernel booted through the 64-bit boot protocol.
    Linux,
    /// The built-in CPL3 test guest (its status block is at a known address).
    TestGuest,
    /// Another static long-mode ELF run at CPL3.
    Elf,
}

/// Section [`SectionId::Machine`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Handoffs so far, counting this one.
    pub generation: u64,
    /// The guest kind.
    pub guest: GuestKind,
}

/// Section [`SectionId::Vm`]: per-VM KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// `KVM_GET_CLOCK`.
    pub clock: kvm_bindings::kvm_clock_data,
    /// PIC master (`KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: kvm_bindings::kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_bindings::kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_bindings::kvm_irqchip,
    /// `KVM_GET_PIT2`.
    pub pit: kvm_bindings::kvm_pit_state2,
}

/// Legacy FPU state (`kvm_fpu`), used only where the host lacks XSAVE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

/// Section [`SectionId::Vcpu`]: one vCPU.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (APIC id).
    pub index: u8,
    /// General registers.
    pub regs: kvm_bindings::kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_bindings::kvm_sregs,
    /// XSAVE area, where the host has XSAVE.
    pub xsave: Option<kvm_bindings::kvm_xsave>,
    /// Legacy FPU state, where it has not.
    pub fpu: Option<FpuState>,
    /// Extended control registers.
    pub xcrs: Option<kvm_bindings::kvm_xcrs>,
    /// Every readable MSR of the host's index list.
    pub msrs: Vec<kvm_bindings::kvm_msr_entry>,
    /// Local APIC.
    pub lapic: kvm_bindings::kvm_lapic_state,
    /// Multiprocessing state.
    pub mp_state: kvm_bindings::kvm_mp_state,
    /// Pending events.
    pub events: kvm_bindings::kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_bindings::kvm_debugregs,
    /// `KVM_VCPU_TSC_OFFSET`, where the kernel has it.
    pub tsc_offset: Option<u64>,
}

/// Section [`SectionId::Serial`]: the 8250 UART's registers and pending input.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Section [`SectionId::I8042`]: the keyboard controller (only its reset line matters here).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct I8042State {
    /// Command byte.
    pub command_byte: u8,
}

/// Section [`SectionId::Timing`] (optional): when the old side started the handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timing {
    /// CLOCK_MONOTONIC ns of the pause request.
    pub pause_requested_ns: u64,
    /// CLOCK_MONOTONIC ns when every vCPU had stopped.
    pub paused_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = StateWriter::default();
        w.add(
            SectionId::Machine,
            1,
            true,
            &MachineState { memory_bytes: 1 << 30, vcpus: 2, generation: 7, guest: GuestKind::TestGuest },
        );
        w.add(SectionId::Timing, 1, false, &Timing { pause_requested_ns: 5, paused_ns: 6 });
        w.finish()
    }

    #[test]
    fn round_trip() {
        let parsed = decode(&sample()).expect("valid");
        let m: MachineState = parsed.first(SectionId::Machine).expect("present").decode().expect("decodes");
        assert_eq!(m.generation, 7);
        assert_eq!(m.vcpus, 2);
        let t: Timing = parsed.first(SectionId::Timing).expect("present").decode().expect("decodes");
        assert_eq!(t.paused_ns, 6);
        assert!(parsed.skipped.is_empty());
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i} was accepted");
        }
    }

    #[test]
    fn truncation_is_rejected_at_every_length() {
        let good = sample();
        for len in 0..good.len() {
            let err = decode(&good[..len]).expect_err("truncated");
            assert!(
                matches!(err, StateError::Truncated { .. } | StateError::BadMagic),
                "len {len}: unexpected {err:?}"
            );
        }
    }

    #[test]
    fn wrong_crc_is_named() {
        let mut bad = sample();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(matches!(decode(&bad), Err(StateError::BadCrc { .. })));
    }

    #[test]
    fn newer_major_is_refused_before_anything_else() {
        let mut w = StateWriter::new(FORMAT_MAJOR + 1, 0);
        w.add_raw(1, 1, true, b"x");
        let err = decode(&w.finish()).expect_err("newer major");
        assert!(matches!(err, StateError::UnsupportedFormat { major: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("2.0"));
    }

    #[test]
    fn newer_minor_with_unknown_optional_section_is_read() {
        let mut w = StateWriter::new(FORMAT_MAJOR, FORMAT_MINOR + 3);
        w.add(SectionId::Timing, 1, false, &Timing::default());
        w.add_raw(999, 1, false, b"future");
        let parsed = decode(&w.finish()).expect("readable");
        assert_eq!(parsed.skipped, vec![(999, 1)]);
        assert_eq!(parsed.sections.len(), 1);
    }

    #[test]
    fn unknown_mandatory_section_is_refused() {
        let mut w = StateWriter::default();
        w.add_raw(999, 1, true, b"future");
        assert_eq!(decode(&w.finish()), Err(StateError::UnknownMandatory { id: 999, version: 1 }));
        let mut w = StateWriter::default();
        w.add_raw(SectionId::Vm.code(), 2, true, b"v2");
        assert_eq!(decode(&w.finish()), Err(StateError::UnknownMandatory { id: 2, version: 2 }));
    }

    #[test]
    fn absurd_length_is_refused_before_reading() {
        let mut bad = sample();
        bad[16..24].copy_from_slice(&(MAX_STATE_BYTES + 1).to_le_bytes());
        let err = read_stream(&mut &bad[..]).expect_err("too long");
        assert_eq!(err, StateError::BadLength(MAX_STATE_BYTES + 1));
    }

    #[test]
    fn state_formats_render_and_parse_back() {
        let this = StateFormats::this_build();
        assert_eq!(StateFormats::parse(&this.render()), Ok(this));
        let other = StateFormats::parse("note\nwrites: 2.7\nreads: 1 2\n").expect("parse");
        assert_eq!(other, StateFormats { writes: (2, 7), reads: vec![1, 2] });
        assert!(StateFormats::parse("writes: 1\nreads: 1\n").is_err());
        assert!(StateFormats::parse("writes: 1.0\nreads: one\n").is_err());
        assert!(StateFormats::parse("reads: 1\n").is_err());
    }

    #[test]
    fn read_stream_reads_exactly_one_stream() {
        let mut two = sample();
        two.extend_from_slice(&sample());
        let mut reader = &two[..];
        let first = read_stream(&mut reader).expect("first");
        assert_eq!(first, sample());
        assert_eq!(reader.len(), sample().len());
    }
}
