# A guest of its own, not the test guest (no status block, no magic): it writes failure code 3
# to the failure port at once and spins. cpr-vmm must report the raw code for it, not the test
# guest's meaning of 3 ("pattern region checksum changed").
.intel_syntax noprefix

.text
.global _start
_start:
    mov eax, 3
    out 0x11, al
1:
    pause
    jmp 1b
