# cpr test guest: a self-checking 64-bit workload that runs at CPL3 with IOPL=3.
#
# Started by cpr-vmm in long mode, identity-mapped, interrupts off, with
#   rdi = one past the top guest-physical RAM address, rsi = flags (bit 1: touch mode, sweep all
#   RAM one page per iteration, skipping the [3 GiB, 4 GiB) MMIO hole; bit 2: flood mode, a
#   heartbeat every FLOOD_MASK+1 iterations, to fill the console), rdx = vCPU index.
# vCPU 0 runs the full workload below; every other vCPU runs the counter check alone, with its
# own status slot at status + 256 * index.
#
# Every iteration it increments one counter in three places (RAM, r12, xmm0) and checks that they
# agree; it keeps the longest TSC gap between two iterations; every HB_MASK+1 iterations it
# re-verifies the checksum of a 1 MiB pattern region and prints one heartbeat line on COM1:
#   HB <seq> <counter> <max gap since last heartbeat, TSC ticks> <pattern checksum>\n   (hex)
# Any failed check writes its code to FAIL_PORT, which cpr-vmm turns into a distinct exit code.
# The status block layout is mirrored by `cpr_testguest::status` (keep them in step).

.intel_syntax noprefix

.equ COM1,            0x3f8
.equ FAIL_PORT,       0x11
.equ HB_MASK,         0x3fffff
.equ FLOOD_MASK,       0xff           # flood mode: a heartbeat every 256 iterations
.equ FLAG_FLOOD,       4
.equ PATTERN_QWORDS,  0x20000          # 1 MiB
.equ PATTERN_MUL,     0x9e3779b97f4a7c15
.equ TOUCH_START,     0x800000
.equ HOLE_START,      0xc0000000
.equ HOLE_END,        0x100000000

# status block offsets (u64 each)
.equ ST_MAGIC,     0
.equ ST_COUNTER,   8
.equ ST_SEQ,       16
.equ ST_GAP_HB,    24
.equ ST_GAP_ALL,   32
.equ ST_SUM,       40
.equ ST_CHECKS,    48
.equ ST_FAIL,      56
.equ ST_SWEEPS,    64
.equ ST_SWEEP_TSC, 72
.equ ST_FLAGS,     80
.equ ST_RAM,       88

.equ FAIL_REG,     1
.equ FAIL_RAM,     2
.equ FAIL_PATTERN, 3

# The counter's three copies (r12, RAM, xmm0) step together and must agree, on every vCPU.
.macro STEP_COUNTER
    inc r12
    inc qword ptr [rbx + ST_COUNTER]
    paddq xmm0, xmm1
    movq rax, xmm0
    cmp rax, r12
    jne fail_reg
    cmp [rbx + ST_COUNTER], r12
    jne fail_ram
.endm

# rax = the 64-bit TSC (clobbers rdx).
.macro READ_TSC
    rdtsc
    shl rdx, 32
    or rax, rdx
.endm

# rcx = ticks since the previous iteration (TSC in rax, previous in r13, which is updated).
.macro GAP_SINCE_LAST
    mov rcx, rax
    sub rcx, r13
    mov r13, rax
.endm

.text
.global _start
_start:
    lea rbx, [rip + status]
    test rdx, rdx
    jnz ap_start
    mov [rbx + ST_RAM], rdi
    mov [rbx + ST_FLAGS], rsi
    mov r15, rsi
    mov rbp, TOUCH_START

    # fill the pattern region: q[i] = (i + 1) * PATTERN_MUL, and record its checksum
    lea rdi, [rip + pattern]
    xor ecx, ecx
    xor r8d, r8d
    movabs r9, PATTERN_MUL
1:  lea rax, [rcx + 1]
    imul rax, r9
    mov [rdi + rcx * 8], rax
    add r8, rax
    rol r8, 1
    inc rcx
    cmp rcx, PATTERN_QWORDS
    jb 1b
    mov [rbx + ST_SUM], r8

    movabs rax, 0x3154534754525043     # "CPRTGST1"
    mov [rbx + ST_MAGIC], rax

    xor r12d, r12d                     # counter copy 1: register
    mov [rbx + ST_COUNTER], r12        # counter copy 2: RAM
    pxor xmm0, xmm0                    # counter copy 3: SSE register
    mov eax, 1
    movq xmm1, rax
    xor r14d, r14d                     # longest gap since the last heartbeat
    READ_TSC
    mov r13, rax                       # TSC at the previous iteration
    mov [rbx + ST_SWEEP_TSC], rax

main_loop:
    STEP_COUNTER

    READ_TSC
    GAP_SINCE_LAST
    cmp rcx, r14
    cmova r14, rcx
    cmp rcx, [rbx + ST_GAP_ALL]
    jbe 2f
    mov [rbx + ST_GAP_ALL], rcx
2:
    test r15, 2
    jz 3f
    mov [rbp], r12                     # touch mode: write one page per iteration
    add rbp, 4096
    movabs rax, HOLE_START
    cmp rbp, rax
    jne 10f
    movabs rbp, HOLE_END
10: cmp rbp, [rbx + ST_RAM]
    jb 3f
    call sweep_done
3:
    mov eax, HB_MASK
    test r15, FLAG_FLOOD
    jz 4f
    mov eax, FLOOD_MASK
4:  test r12, rax
    jnz main_loop
    call heartbeat
    rdtsc                              # the heartbeat's own work is not a gap
    shl rdx, 32
    or rax, rdx
    mov r13, rax
    jmp main_loop

# Any vCPU but the first: the three-copy counter check and the gap record, in its own slot.
ap_start:
    shl rdx, 8
    add rbx, rdx
    xor r12d, r12d
    mov [rbx + ST_COUNTER], r12
    pxor xmm0, xmm0
    mov eax, 1
    movq xmm1, rax
    READ_TSC
    mov r13, rax
ap_loop:
    STEP_COUNTER
    READ_TSC
    GAP_SINCE_LAST
    cmp rcx, [rbx + ST_GAP_ALL]
    jbe ap_loop
    mov [rbx + ST_GAP_ALL], rcx
    jmp ap_loop

# One full sweep of RAM in touch mode: print "SW <n> <ticks>".
sweep_done:
    mov rbp, TOUCH_START
    inc qword ptr [rbx + ST_SWEEPS]
    READ_TSC
    mov r10, rax
    sub rax, [rbx + ST_SWEEP_TSC]
    mov [rbx + ST_SWEEP_TSC], r10
    mov r11, rax
    lea rsi, [rip + sw_prefix]
    call puts
    mov rax, [rbx + ST_SWEEPS]
    call put_hex
    mov al, ' '
    call putc
    mov rax, r11
    call put_hex
    mov al, '\n'
    call putc
    ret

heartbeat:
    # re-verify the pattern region
    lea rdi, [rip + pattern]
    xor ecx, ecx
    xor r8d, r8d
4:  add r8, [rdi + rcx * 8]
    rol r8, 1
    inc rcx
    cmp rcx, PATTERN_QWORDS
    jb 4b
    cmp r8, [rbx + ST_SUM]
    jne fail_pattern
    inc qword ptr [rbx + ST_CHECKS]

    inc qword ptr [rbx + ST_SEQ]
    mov [rbx + ST_GAP_HB], r14
    lea rsi, [rip + hb_prefix]
    call puts
    mov rax, [rbx + ST_SEQ]
    call put_hex
    mov al, ' '
    call putc
    mov rax, r12
    call put_hex
    mov al, ' '
    call putc
    mov rax, r14
    call put_hex
    mov al, ' '
    call putc
    mov rax, r8
    call put_hex
    mov al, '\n'
    call putc
    xor r14d, r14d
.ifdef BREAK
    # the broken variant: after the third heartbeat, let the register copy drift on purpose
    cmp qword ptr [rbx + ST_SEQ], 3
    jne 5f
    inc r12
5:
.endif
    ret

# al -> COM1
putc:
    mov dx, COM1
    out dx, al
    ret

# zero-terminated string at rsi -> COM1
puts:
    mov dx, COM1
6:  mov al, [rsi]
    test al, al
    jz 7f
    out dx, al
    inc rsi
    jmp 6b
7:  ret

# rax as 16 hex digits -> COM1 (clobbers rcx, rdx, r9, r10)
put_hex:
    mov r9, rax
    mov ecx, 16
8:  rol r9, 4
    mov eax, r9d
    and eax, 0xf
    lea r10, [rip + hex_digits]
    mov al, [r10 + rax]
    mov dx, COM1
    out dx, al
    dec ecx
    jnz 8b
    ret

fail_reg:
    mov eax, FAIL_REG
    jmp fail
fail_ram:
    mov eax, FAIL_RAM
    jmp fail
fail_pattern:
    mov eax, FAIL_PATTERN
fail:
    mov [rbx + ST_FAIL], rax
    out FAIL_PORT, al
9:  pause
    jmp 9b

hb_prefix:  .asciz "HB "
sw_prefix:  .asciz "SW "
hex_digits: .ascii "0123456789abcdef"

.data
.balign 4096
status:
    .zero 4096

.bss
.balign 4096
pattern:
    .zero PATTERN_QWORDS * 8
