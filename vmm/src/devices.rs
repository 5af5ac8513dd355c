//! Port-I/O devices: the 8250 UART on 0x3f8 (vm-superio), the i8042 reset line on 0x64, and
//! the test guest's failure port.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use cpr_proto::state::{I8042State, SerialState};
use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// The UART's IRQ line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND: u16 = 0x64;

/// An interrupt line backed by an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a port write asks the VMM to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioEffect {
    /// Nothing beyond the device's own work.
    None,
    /// The guest asked for a reset (i8042 0xfe): the VMM exits cleanly.
    Reset,
    /// The test guest reported a failed self-check with this code.
    GuestFailed(u8),
}

/// The serial output sink: a host fd, written unbuffered so that nothing is lost at a handoff.
#[derive(Debug)]
pub struct SerialOut(pub File);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A full or closed console must never stop the guest: drop output on error.
        Ok(self.0.write(buf).unwrap_or(buf.len()))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reset requests from the i8042 land here.
#[derive(Debug, Default)]
pub struct ResetFlag(std::sync::atomic::AtomicBool);

impl Trigger for &ResetFlag {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The devices of one VM.
#[derive(Debug)]
pub struct Devices {
    serial: Mutex<Serial<IrqLine, NoEvents, SerialOut>>,
    reset: ResetFlag,
    i8042_command: Mutex<u8>,
    fail_port: Option<u16>,
}

impl Devices {
    /// Devices writing serial output to `out`; `fail_port` is watched for test-guest failures.
    pub fn new(irq: IrqLine, out: File, fail_port: Option<u16>) -> Self {
        Self {
            serial: Mutex::new(Serial::new(irq, SerialOut(out))),
            reset: ResetFlag::default(),
            i8042_command: Mutex::new(0),
            fail_port,
        }
    }

    /// Loads device state carried by a handoff, replacing the current state.
    pub fn load(&self, serial: &SerialState, i8042: &I8042State) -> Result<(), String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: serial.baud_divisor_low,
            baud_divisor_high: serial.baud_divisor_high,
            interrupt_enable: serial.interrupt_enable,
            interrupt_identification: serial.interrupt_identification,
            line_control: serial.line_control,
            line_status: serial.line_status,
            modem_control: serial.modem_control,
            modem_status: serial.modem_status,
            scratch: serial.scratch,
            in_buffer: serial.in_buffer.clone(),
        };
        let mut current = lock(&self.serial);
        let irq = IrqLine(current.interrupt_evt().0.try_clone().map_err(|e| format!("cannot dup serial irqfd: {e}"))?);
        let out = SerialOut(current.writer().0.try_clone().map_err(|e| format!("cannot dup serial output: {e}"))?);
        *current =
            Serial::from_state(&state, irq, NoEvents, out).map_err(|e| format!("serial state is invalid: {e:?}"))?;
        // vm-superio's `from_state` raises a pending THR-empty or data interrupt again: one the
        // old VM's interrupt controller had not taken when it was saved (KVM injects an irqfd's
        // IOAPIC edge from a kernel worker) is not lost (checked by a test below).
        *lock(&self.i8042_command) = i8042.command_byte;
        Ok(())
    }

    /// Writes the serial console to `out` from now on (the one before is closed).
    pub fn set_serial_out(&self, out: File) {
        lock(&self.serial).writer_mut().0 = out;
    }

    /// Saves the device state.
    pub fn save(&self) -> (SerialState, I8042State) {
        let s = lock(&self.serial).state();
        let serial = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        (serial, I8042State { command_byte: *lock(&self.i8042_command) })
    }

    /// A guest write to an I/O port.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioEffect {
        let Some(&value) = data.first() else {
            return PioEffect::None;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                let offset = u8::try_from(p - COM1_BASE).unwrap_or(0);
                // An interrupt that cannot be raised is not worth stopping the guest for.
                let _ = lock(&self.serial).write(offset, value);
                PioEffect::None
            }
            I8042_COMMAND => {
                *lock(&self.i8042_command) = value;
                let mut dev = I8042Device::new(&self.reset);
                let _ = dev.write(4, value);
                if self.reset.0.load(std::sync::atomic::Ordering::SeqCst) { PioEffect::Reset } else { PioEffect::None }
            }
            p if Some(p) == self.fail_port => PioEffect::GuestFailed(value),
            _ => PioEffect::None,
        }
    }

    /// A guest read from an I/O port; unclaimed ports read as all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                lock(&self.serial).read(u8::try_from(p - COM1_BASE).unwrap_or(0))
            }
            I8042_DATA | I8042_COMMAND => 0,
            _ => 0xff,
        };
        data.fill(value);
    }

    /// A duplicate of the serial output fd (handed to the next VMM).
    pub fn serial_out_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        lock(&self.serial).writer().0.as_fd().try_clone_to_owned()
    }

    /// Queues console input for the guest.
    pub fn serial_input(&self, bytes: &[u8]) {
        let _ = lock(&self.serial).enqueue_raw_bytes(bytes);
    }
}

/// Locks a mutex, taking the data even if another thread panicked while holding it
/// (the VMM aborts on panic, so a poisoned lock cannot be observed in practice).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    fn devices() -> (Devices, File) {
        let file = tempfile::tempfile().expect("tempfile");
        let out = file.try_clone().expect("dup");
        let irq = IrqLine(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd"));
        (Devices::new(irq, out, Some(0x11)), file)
    }

    #[test]
    fn serial_output_reaches_the_host_fd() {
        let (d, mut file) = devices();
        for b in b"hi\n" {
            assert_eq!(d.pio_write(COM1_BASE, &[*b]), PioEffect::None);
        }
        let mut s = String::new();
        file.rewind().expect("rewind");
        file.read_to_string(&mut s).expect("read");
        assert_eq!(s, "hi\n");
    }

    /// A UART saved with an interrupt pending (THR empty, enabled) raises its line again when
    /// loaded (vm-superio does it; a handoff relies on it); one saved with none pending does not.
    #[test]
    fn a_pending_serial_interrupt_is_raised_again_after_a_load() {
        let (d, _f) = devices();
        let state = |iir: u8| SerialState {
            interrupt_enable: 0x02,
            interrupt_identification: iir,
            line_status: 0x60,
            ..SerialState::default()
        };
        let raised = |d: &Devices| lock(&d.serial).interrupt_evt().0.read().is_ok();
        d.load(&state(0x02), &I8042State::default()).expect("load");
        assert!(raised(&d), "THR-empty interrupt pending: the line is raised");
        d.load(&state(0x01), &I8042State::default()).expect("load");
        assert!(!raised(&d), "nothing pending: no interrupt");
    }

    #[test]
    fn i8042_reset_and_fail_port_are_reported() {
        let (d, _f) = devices();
        assert_eq!(d.pio_write(I8042_COMMAND, &[0x20]), PioEffect::None);
        assert_eq!(d.pio_write(0x11, &[2]), PioEffect::GuestFailed(2));
        assert_eq!(d.pio_write(I8042_COMMAND, &[0xfe]), PioEffect::Reset);
    }

    #[test]
    fn state_round_trips() {
        let (d, _f) = devices();
        d.pio_write(COM1_BASE + 7, &[0x5a]); // scratch register
        d.serial_input(b"q");
        let (serial, i8042) = d.save();
        assert_eq!(serial.scratch, 0x5a);
        let (d2, _f2) = devices();
        d2.load(&serial, &i8042).expect("load");
        assert_eq!(d2.save().0, serial);
    }
}
