# A 512-byte boot sector that keeps rewriting memory so migrations see dirty pages:
# 64 pages at 0x20000 get a counter stamped every 256 bytes (small xbzrle deltas),
# 16 pages at 0x40000 get a pseudo-random fill (incompressible-ish full pages).
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    mov $0x1234, %si        # LCG state
    xor %dx, %dx            # counter
loop:
    inc %dx
    mov $0x2000, %ax
    mov %ax, %es
    xor %di, %di
1:  mov %dx, %es:(%di)
    add $256, %di
    jnz 1b                  # 64 KiB at 0x20000 = 16 pages
    mov $0x3000, %ax
    mov %ax, %es
    xor %di, %di
2:  mov %dx, %es:(%di)
    add $256, %di
    jnz 2b
    mov $0x4000, %ax
    mov %ax, %es
    xor %di, %di
    mov $0x4000, %cx        # 16K words = 32 KiB = 8 pages
3:  imul $25173, %si, %si
    add $13849, %si
    mov %si, %ax
    stosw
    loop 3b
    jmp loop
    .org 510
    .byte 0x55, 0xaa
