//! Assembles the test guest (`guest/testguest.s`) and a guest of its own (`guest/failcode.s`) into
//! static long-mode ELF files with binutils.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?} (binutils `as`/`ld` are required): {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn assemble(src: &Path, out_dir: &Path, name: &str, defsyms: &[&str]) {
    let obj = out_dir.join(format!("{name}.o"));
    let elf = out_dir.join(format!("{name}.elf"));
    let mut as_cmd = Command::new("as");
    as_cmd.arg("--64");
    for sym in defsyms {
        as_cmd.arg("--defsym").arg(sym);
    }
    run(as_cmd.arg("-o").arg(&obj).arg(src));
    run(Command::new("ld")
        .args(["-static", "-nostdlib", "-z", "noexecstack", "-z", "noseparate-code"])
        .args(["-z", "max-page-size=4096", "-e", "_start"])
        .args(["-Ttext=0x200000", "-Tdata=0x300000", "-Tbss=0x400000"])
        .arg("-o")
        .arg(&elf)
        .arg(&obj));
}

fn main() {
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let src = Path::new("guest/testguest.s");
    println!("cargo:rerun-if-changed=guest/testguest.s");
    assemble(src, &out_dir, "testguest", &[]);
    assemble(src, &out_dir, "testguest-broken", &["BREAK=1"]);
    println!("cargo:rerun-if-changed=guest/failcode.s");
    assemble(Path::new("guest/failcode.s"), &out_dir, "failcode", &[]);
}
