//! The Intel MultiProcessor Specification 1.4 table, which tells a Linux guest how many CPUs it
//! has and how ISA interrupts reach the IOAPIC. Written field by field, little endian, at the
//! start of the EBDA (0x9fc00), which the e820 map reserves.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Where the table goes (start of the EBDA).
pub const MPTABLE_START: u64 = 0x9_fc00;
/// End of the reserved area it must fit in.
const MPTABLE_LIMIT: u64 = 0xa_0000;
/// Local APIC base address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;
/// Largest vCPU count the table describes (APIC ids 0..254; 255 is the broadcast id).
pub const MAX_CPUS: u8 = 254;

/// Why the table could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// Bad vCPU count.
    #[error("an MP table needs 1 to {MAX_CPUS} CPUs, not {0}")]
    CpuCount(u8),
    /// It does not fit below 0xa0000.
    #[error("MP table of {0} bytes does not fit in the EBDA")]
    TooLarge(usize),
    /// Guest memory write failed.
    #[error("cannot write the MP table: {0}")]
    Write(String),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

fn entry8(kind: u8, rest: [u8; 7]) -> [u8; 8] {
    let mut e = [0u8; 8];
    e[0] = kind;
    e[1..].copy_from_slice(&rest);
    e
}

/// The table for `vcpus` CPUs placed at `base`: floating pointer (16 bytes) then the configuration table.
pub fn build_mptable(vcpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_CPUS {
        return Err(MptableError::CpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = cpu; // local APIC id
        e[2] = APIC_VERSION;
        e[3] = 0x01 | if cpu == 0 { 0x02 } else { 0 }; // enabled, bootstrap processor
        e[4..8].copy_from_slice(&0x0000_0600u32.to_le_bytes()); // signature: family 6
        e[8..12].copy_from_slice(&0x0000_0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&entry8(1, [0, b'I', b'S', b'A', b' ', b' ', b' '])); // bus 0: ISA
    count += 1;
    let io = IOAPIC_ADDR.to_le_bytes();
    entries.extend_from_slice(&entry8(2, [ioapic_id, IOAPIC_VERSION, 0x01, io[0], io[1], io[2], io[3]]));
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, conforming polarity and trigger, ISA bus irq -> IOAPIC pin irq.
        entries.extend_from_slice(&entry8(3, [0, 0, 0, 0, irq, ioapic_id, irq]));
        count += 1;
    }
    // Local interrupts: ExtINT -> LINT0 and NMI -> LINT1 on every local APIC (id 0xff).
    entries.extend_from_slice(&entry8(4, [3, 0, 0, 0, 0, 0xff, 0]));
    entries.extend_from_slice(&entry8(4, [1, 0, 0, 0, 0, 0xff, 1]));
    count += 2;

    let table_len = 44 + entries.len();
    let total = 16 + table_len;
    if base + total as u64 > MPTABLE_LIMIT {
        return Err(MptableError::TooLarge(total));
    }
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&u16::try_from(table_len).map_err(|_| MptableError::TooLarge(total))?.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"CPRD    "); // OEM id
    header.extend_from_slice(b"CPR-VMM     "); // product id
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    let table_addr = u32::try_from(base + 16).map_err(|_| MptableError::TooLarge(total))?;
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&header);
    Ok(fp)
}

/// Writes the table for `vcpus` CPUs at [`MPTABLE_START`]; returns its size.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, vcpus: u8) -> Result<usize, MptableError> {
    let bytes = build_mptable(vcpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(|e| MptableError::Write(e.to_string()))?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_follows_the_spec() {
        let t = build_mptable(2, MPTABLE_START).expect("table");
        assert_eq!(MPTABLE_START % 16, 0, "16-byte aligned");
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(u64::from(u32_at(&t, 4)), MPTABLE_START + 16, "physical pointer to the config table");
        assert_eq!(t[8], 1, "length in paragraphs");
        assert_eq!(t[9], 4, "spec revision 1.4");
        assert_eq!(sum(&t[..16]), 0, "checksum");
        assert_eq!(t[11], 0, "feature byte 1: a configuration table is present");
    }

    #[test]
    fn config_table_header_and_entries_follow_the_spec() {
        for n in [1u8, 2, 8] {
            let t = build_mptable(n, MPTABLE_START).expect("table");
            let h = &t[16..];
            assert_eq!(&h[0..4], b"PCMP");
            let len = usize::from(u16_at(h, 4));
            assert_eq!(len, h.len(), "base table length");
            assert_eq!(h[6], 4, "spec revision");
            assert_eq!(sum(&h[..len]), 0, "checksum");
            let count = usize::from(u16_at(h, 34));
            assert_eq!(count, usize::from(n) + 1 + 1 + 16 + 2, "entry count");
            assert_eq!(u32_at(h, 36), 0xfee0_0000, "local APIC address");
            // walk the entries by their type-defined sizes
            let mut at = 44;
            let mut kinds = Vec::new();
            for _ in 0..count {
                let kind = h[at];
                kinds.push(kind);
                if kind == 0 {
                    let cpu = h[at + 1];
                    assert_eq!(h[at + 3] & 1, 1, "cpu {cpu} enabled");
                    assert_eq!(h[at + 3] & 2 != 0, cpu == 0, "BSP flag only on cpu 0");
                    at += 20;
                } else {
                    if kind == 2 {
                        assert_eq!(h[at + 1], n, "IOAPIC id after the CPUs");
                        assert_eq!(u32_at(h, at + 4), 0xfec0_0000, "IOAPIC address");
                    }
                    if kind == 3 {
                        assert_eq!(h[at + 5], h[at + 7], "ISA irq n goes to IOAPIC pin n");
                    }
                    at += 8;
                }
            }
            assert_eq!(at, len, "entries fill the table exactly");
            let cpus: Vec<u8> = (0..n).map(|i| h[44 + 20 * usize::from(i) + 1]).collect();
            assert_eq!(cpus, (0..n).collect::<Vec<_>>(), "APIC ids 0..n");
            assert_eq!(kinds.iter().filter(|k| **k == 3).count(), 16);
            assert_eq!(kinds.iter().filter(|k| **k == 4).count(), 2);
        }
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert_eq!(build_mptable(0, MPTABLE_START), Err(MptableError::CpuCount(0)));
        assert_eq!(build_mptable(255, MPTABLE_START), Err(MptableError::CpuCount(255)));
        assert!(build_mptable(254, MPTABLE_START).is_err(), "254 CPUs do not fit in the EBDA");
    }
}
