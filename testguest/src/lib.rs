//! The cpr test guest: a small self-checking 64-bit program that runs at CPL3 on any `/dev/kvm`,
//! including the shadow-paging `kvm_pvm` hypervisor, where a stock Linux kernel cannot boot.
//!
//! It is assembled from `guest/testguest.s` at build time. Its contract with the VMM (entry
//! registers, the status block, the failure port and the heartbeat line) is described here so
//! that the VMM, the tests and the benchmarks read it from one place.
//!
//! ```
//! let hb = cpr_testguest::Heartbeat::parse("HB 0000000000000003 0000000000c00000 0000000000000100 00000000deadbeef")
//!     .expect("a valid heartbeat line");
//! assert_eq!(hb.seq, 3);
//! assert_eq!(hb.counter, 0xc0_0000);
//! ```

/// The test guest, as a static ELF linked at [`TEXT_ADDR`].
pub static TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// A variant that breaks its own register/RAM invariant after its third heartbeat, on purpose,
/// so that tests can check that a guest self-check failure is detected and reported.
pub static BROKEN_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest-broken.elf"));

/// A guest that is not the test guest: it writes failure code 3 to [`FAIL_PORT`] at once, so
/// that tests can check that cpr-vmm reports another guest's codes raw, without the test
/// guest's meanings.
pub static FAILCODE_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/failcode.elf"));

/// Guest-physical address of the guest's code.
pub const TEXT_ADDR: u64 = 0x20_0000;
/// Guest-physical address of the status block (one 4 KiB page of little-endian u64 fields).
/// vCPU 0 uses the fields at offset 0; vCPU n > 0 keeps its counter and gap at `n * AP_SLOT_BYTES`.
pub const STATUS_ADDR: u64 = 0x30_0000;
/// Size of each vCPU's slot in the status block.
pub const AP_SLOT_BYTES: u64 = 256;
/// Guest-physical address of the 1 MiB pattern region whose checksum the guest re-verifies.
pub const PATTERN_ADDR: u64 = 0x40_0000;
/// Size of the pattern region in bytes.
pub const PATTERN_BYTES: u64 = 1 << 20;
/// In touch mode the guest sweeps RAM from here to the end, one 4 KiB page per iteration.
pub const TOUCH_START: u64 = 0x80_0000;
/// Smallest guest RAM the test guest fits in (code, data, pattern and the touch area start).
pub const MIN_RAM_BYTES: u64 = 16 << 20;
/// The I/O port a failing self-check writes its failure code to.
pub const FAIL_PORT: u16 = 0x11;
/// Flag bit passed in `rsi`: sweep all of RAM, one page per iteration, printing `SW` lines.
pub const FLAG_TOUCH: u64 = 1 << 1;
/// Flag bit passed in `rsi`: flood mode, a heartbeat every 256 iterations instead of every
/// [`HEARTBEAT_EVERY`], to fill the serial console as fast as the guest can.
pub const FLAG_FLOOD: u64 = 1 << 2;
/// Iterations between heartbeats (the guest prints one every `HEARTBEAT_EVERY` iterations).
pub const HEARTBEAT_EVERY: u64 = 0x40_0000;

/// Byte offsets of the fields of the status block at [`STATUS_ADDR`].
pub mod status {
    /// `b"CPRTGST1"` once the guest has initialised itself.
    pub const MAGIC: u64 = 0;
    /// The RAM copy of the iteration counter.
    pub const COUNTER: u64 = 8;
    /// Number of heartbeats printed so far.
    pub const SEQ: u64 = 16;
    /// Longest gap between two iterations in the last heartbeat interval (TSC ticks).
    pub const GAP_LAST_HEARTBEAT: u64 = 24;
    /// Longest gap between two iterations since the host last wrote 0 here (TSC ticks).
    pub const GAP_SINCE_RESET: u64 = 32;
    /// Checksum of the pattern region, computed once at start.
    pub const PATTERN_SUM: u64 = 40;
    /// Number of successful pattern re-verifications.
    pub const PATTERN_CHECKS: u64 = 48;
    /// Failure code, 0 while every check holds.
    pub const FAIL: u64 = 56;
    /// Completed sweeps of RAM in touch mode.
    pub const SWEEPS: u64 = 64;
    /// TSC at the end of the last sweep.
    pub const SWEEP_TSC: u64 = 72;
    /// The flags the guest was started with.
    pub const FLAGS: u64 = 80;
    /// The RAM size the guest was started with.
    pub const RAM_BYTES: u64 = 88;
    /// Little-endian value of the magic field.
    pub const MAGIC_VALUE: u64 = u64::from_le_bytes(*b"CPRTGST1");
}

/// Why the guest gave up; the value it writes to [`FAIL_PORT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailCode {
    /// The register and SSE copies of the counter disagree.
    Register,
    /// The RAM copy of the counter disagrees with the register copy.
    Ram,
    /// The pattern region's checksum changed.
    Pattern,
    /// A value the guest does not define.
    Unknown(u8),
}

impl FailCode {
    /// Decodes the byte written to [`FAIL_PORT`].
    pub fn from_port_value(value: u8) -> Self {
        match value {
            1 => Self::Register,
            2 => Self::Ram,
            3 => Self::Pattern,
            other => Self::Unknown(other),
        }
    }
}

impl std::fmt::Display for FailCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Register => write!(f, "register and SSE copies of the counter disagree"),
            Self::Ram => write!(f, "RAM copy of the counter disagrees with the register copy"),
            Self::Pattern => write!(f, "pattern region checksum changed"),
            Self::Unknown(v) => write!(f, "unknown failure code {v}"),
        }
    }
}

/// One heartbeat line, `HB <seq> <counter> <gap> <sum>` in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Heartbeat sequence number, 1 for the first.
    pub seq: u64,
    /// The counter when the heartbeat was printed.
    pub counter: u64,
    /// Longest gap between two iterations since the previous heartbeat, in TSC ticks.
    pub max_gap_ticks: u64,
    /// Checksum of the pattern region, re-verified just before the line was printed.
    pub pattern_sum: u64,
}

impl Heartbeat {
    /// Parses one heartbeat line (without its newline); `None` for anything else.
    pub fn parse(line: &str) -> Option<Self> {
        let mut fields = line.strip_prefix("HB ")?.split(' ');
        let mut next = || fields.next().filter(|f| f.len() == 16).and_then(|f| u64::from_str_radix(f, 16).ok());
        let hb = Heartbeat { seq: next()?, counter: next()?, max_gap_ticks: next()?, pattern_sum: next()? };
        fields.next().is_none().then_some(hb)
    }

    /// All complete heartbeat lines in `text`, in order; other lines, and a last line still
    /// being written (no newline yet), are ignored.
    pub fn all_in(text: &str) -> Vec<Self> {
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete.lines().filter_map(Self::parse).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_images_are_x86_64_executables_at_the_documented_address() {
        for elf in [TEST_GUEST_ELF, BROKEN_GUEST_ELF] {
            assert_eq!(&elf[..4], b"\x7fELF");
            assert_eq!(elf[4], 2, "64-bit");
            assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "x86-64");
            let entry = u64::from_le_bytes(elf[24..32].try_into().expect("8 bytes"));
            assert_eq!(entry, TEXT_ADDR);
        }
        assert_ne!(TEST_GUEST_ELF, BROKEN_GUEST_ELF);
    }

    #[test]
    fn heartbeat_parse_rejects_other_lines() {
        let f = |v: u64| format!("{v:016x}");
        let line = |a, b, c, d| format!("HB {} {} {} {}", f(a), f(b), f(c), f(d));
        assert!(Heartbeat::parse("SW 1 2").is_none());
        assert!(Heartbeat::parse(&line(1, 2, 3, 4)[..40]).is_none(), "a cut line");
        assert!(Heartbeat::parse("HB 1 2 3 4").is_none(), "short fields");
        let text = format!("noise\n{}\nSW 1 5\n{}\n{}", line(1, 2, 3, 4), line(2, 4, 3, 4), &line(3, 5, 3, 4)[..50]);
        assert_eq!(Heartbeat::all_in(&text).len(), 2, "the unfinished last line is ignored");
    }
}
