/*
 * An ordinary toy kernel, as people boot with qemu-system-x86_64 -kernel: it prints
 * over the UART (polling LSR), reads the Multiboot information, sets up its IDT,
 * takes and handles a #UD and a #PF, talks to the PC devices such kernels touch,
 * and powers off through the isa-debug-exit port 0xf4.
 *
 * Exit status: N from "exit=N" on the command line (default 0) when every check
 * passes, else 0x40 + the number of the first failed check.
 */
#include <stdint.h>

struct mb_info {
	uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
	uint32_t syms[4];
	uint32_t mmap_length, mmap_addr;
	uint32_t drives_length, drives_addr, config_table, boot_loader_name;
};

struct mb_mmap { uint32_t size; uint64_t base, length; uint32_t type; } __attribute__((packed));
struct mb_module { uint32_t start, end, cmdline, pad; };

struct frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

struct idt_gate {
	uint16_t off0, sel;
	uint8_t ist, type;
	uint16_t off1;
	uint32_t off2, zero;
};

extern uint64_t isr_table[20], isr_timer[1];
extern uint64_t pdpt[512], pd_extra[512];

static struct idt_gate idt[256];
volatile unsigned long ud_count, pf_count, timer_ticks;
volatile uint64_t last_cr2, last_error;
static int failed;

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* -- serial console ------------------------------------------------------------- */
#define COM1 0x3f8

static void uart_init(void)
{
	outb(COM1 + 1, 0x00);             /* no interrupts */
	outb(COM1 + 3, 0x80);             /* DLAB */
	outb(COM1 + 0, 0x01);             /* divisor 1: 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);             /* 8N1 */
	outb(COM1 + 2, 0xC7);             /* FIFO on, cleared */
}

static void putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))   /* LSR: THR empty */
		;
	outb(COM1, (uint8_t)c);
}

static void puts(const char *s)
{
	while (*s) {
		if (*s == '\n')
			putc('\r');
		putc(*s++);
	}
}

static void puthex(uint64_t v)
{
	char buf[19];
	int i = 18;
	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts(&buf[i]);
}

static void putdec(uint64_t v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts(&buf[i]);
}

static void check(int n, int ok, const char *what)
{
	puts(ok ? "ok   " : "FAIL ");
	putdec((uint64_t)n);
	puts(" ");
	puts(what);
	puts("\n");
	if (!ok && !failed)
		failed = n;
}

void power_off(int status)
{
	outb(0xf4, (uint8_t)status);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* -- exceptions ----------------------------------------------------------------- */
void isr_handler(struct frame *f)
{
	if (f->vector == 6) {                /* #UD: skip the ud2 */
		ud_count++;
		f->rip += 2;
		return;
	}
	if (f->vector == 14) {               /* #PF: map the 2 MiB page at 4 GiB to 16 MiB */
		uint64_t cr2;
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		last_cr2 = cr2;
		last_error = f->error;
		pf_count++;
		pd_extra[0] = 0x1000000 | 0x83;
		pdpt[4] = (uint64_t)(uintptr_t)pd_extra | 3;
		__asm__ volatile("invlpg (%0)" :: "r"(cr2) : "memory");
		return;
	}
	if (f->vector == 0x40) {             /* local APIC timer */
		timer_ticks++;
		*(volatile uint32_t *)(uintptr_t)0xfee000b0u = 0;   /* EOI */
		return;
	}
	puts("unexpected exception ");
	putdec(f->vector);
	puts(" at ");
	puthex(f->rip);
	puts("\n");
	power_off(0x7f);
}

static void set_gate(int v, uint64_t h)
{
	idt[v].off0 = (uint16_t)h;
	idt[v].sel = 0x08;
	idt[v].ist = 0;
	idt[v].type = 0x8E;                   /* present, DPL 0, 64-bit interrupt gate */
	idt[v].off1 = (uint16_t)(h >> 16);
	idt[v].off2 = (uint32_t)(h >> 32);
	idt[v].zero = 0;
}

static void idt_init(void)
{
	for (int v = 0; v < 20; v++)
		set_gate(v, isr_table[v]);
	set_gate(0x40, isr_timer[0]);
	struct { uint16_t limit; uint64_t base; } __attribute__((packed)) d = { sizeof(idt) - 1, (uint64_t)idt };
	__asm__ volatile("lidt %0" :: "m"(d));
}

/* -- devices -------------------------------------------------------------------- */
static uint32_t fw_cfg_u32(uint16_t key)
{
	uint32_t v = 0;
	outw(0x510, key);
	for (int i = 0; i < 4; i++)
		v |= (uint32_t)inb(0x511) << (8 * i);
	return v;
}

static uint8_t cmos(uint8_t reg)
{
	outb(0x70, reg);
	return inb(0x71);
}

static uint32_t apic(uint32_t off)
{
	return *(volatile uint32_t *)(uintptr_t)(0xfee00000u + off);
}

static void apic_write(uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(uintptr_t)(0xfee00000u + off) = v;
}

static int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static int exit_code(const char *cmdline)
{
	for (const char *p = cmdline; *p; p++) {
		if (p[0] == 'e' && p[1] == 'x' && p[2] == 'i' && p[3] == 't' && p[4] == '=') {
			int v = 0;
			for (p += 5; *p >= '0' && *p <= '9'; p++)
				v = v * 10 + (*p - '0');
			return v;
		}
	}
	return 0;
}

int kmain(uint32_t magic, uint32_t info_addr)
{
	struct mb_info *mbi = (struct mb_info *)(uintptr_t)info_addr;
	const char *cmdline = "";

	uart_init();
	puts("hello from a multiboot kernel in long mode\n");
	puts(magic == 0x2BADB002 ? "entered by a Multiboot loader\n" : "entered as an ELF64 kernel\n");
	check(1, mbi->flags == 0x24f, "multiboot info flags 0x24f");
	check(2, mbi->mem_lower == 639, "mem_lower 639 KiB");
	puts("mem_upper KiB: ");
	putdec(mbi->mem_upper);
	puts("\ncmdline: ");
	if (mbi->flags & 4)
		cmdline = (const char *)(uintptr_t)mbi->cmdline;
	puts(cmdline);
	puts("\nloader: ");
	puts((const char *)(uintptr_t)mbi->boot_loader_name);
	puts("\n");
	check(3, str_eq((const char *)(uintptr_t)mbi->boot_loader_name, "qemu"), "boot loader name");
	uint64_t ram = 0;
	for (uint32_t off = 0; off < mbi->mmap_length;) {
		struct mb_mmap *m = (struct mb_mmap *)(uintptr_t)(mbi->mmap_addr + off);
		puts("mmap ");
		puthex(m->base);
		puts(" ");
		puthex(m->length);
		puts(" type ");
		putdec(m->type);
		puts("\n");
		if (m->type == 1)
			ram += m->length;
		off += m->size + 4;
	}
	check(4, ram == 0x9fc00 + (uint64_t)mbi->mem_upper * 1024, "memory map agrees with mem_upper");
	puts("modules: ");
	putdec(mbi->mods_count);
	puts("\n");
	for (uint32_t i = 0; i < mbi->mods_count; i++) {
		struct mb_module *m = (struct mb_module *)(uintptr_t)mbi->mods_addr + i;
		puts("module ");
		puts((const char *)(uintptr_t)m->cmdline);
		puts(" at ");
		puthex(m->start);
		puts(" size ");
		putdec(m->end - m->start);
		puts(" first line: ");
		for (const char *c = (const char *)(uintptr_t)m->start; c < (const char *)(uintptr_t)m->end && *c && *c != '\n'; c++)
			putc(*c);
		puts("\n");
		check(5, (m->start & 0xfff) == 0, "module page-aligned");
	}

	idt_init();
	__asm__ volatile("ud2");
	check(6, ud_count == 1, "#UD taken and handled");

	volatile uint64_t *far = (volatile uint64_t *)0x100000000ull;
	*far = 0x5eed5eed5eed5eedull;       /* not mapped: #PF, the handler maps it */
	check(7, pf_count == 1 && last_cr2 == 0x100000000ull && last_error == 2, "#PF at 4 GiB (write, not present)");
	check(8, *(volatile uint64_t *)0x1000000 == 0x5eed5eed5eed5eedull, "the page at 4 GiB is RAM at 16 MiB");

	char sig[5] = { 0 };
	outw(0x510, 0);
	for (int i = 0; i < 4; i++)
		sig[i] = (char)inb(0x511);
	check(9, str_eq(sig, "QEMU"), "fw_cfg signature");
	check(10, fw_cfg_u32(5) == 1, "fw_cfg CPU count 1");
	puts("fw_cfg RAM bytes: ");
	puthex(fw_cfg_u32(3));
	puts("\n");

	uint32_t eax, ebx, ecx, edx;
	char vendor[13] = { 0 };
	__asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0), "c"(0));
	*(uint32_t *)&vendor[0] = ebx;
	*(uint32_t *)&vendor[4] = edx;
	*(uint32_t *)&vendor[8] = ecx;
	puts("cpu vendor: ");
	puts(vendor);
	puts("\n");
	__asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
	check(11, (edx & (1u << 9)) && (edx & (1u << 6)), "cpuid: APIC and PAE");

	check(12, (apic(0x30) & 0xff) == 0x14 && (apic(0x20) >> 24) == 0, "local APIC version 0x14, ID 0");
	apic_write(0xf0, 0x1ff);              /* software enable, spurious vector 0xff */
	apic_write(0x3e0, 0x0b);              /* divide by 1 */
	apic_write(0x320, 0x20040);           /* periodic, vector 0x40 */
	apic_write(0x380, 20000);             /* every 20000 bus ticks (instructions) */
	uint32_t c1 = apic(0x390);
	for (volatile int i = 0; i < 100; i++)
		;
	uint32_t c2 = apic(0x390);
	check(15, c1 <= 20000 && c2 < c1, "APIC timer current count runs down");
	__asm__ volatile("sti");
	while (timer_ticks < 3)
		__asm__ volatile("hlt");
	__asm__ volatile("cli");
	apic_write(0x380, 0);                 /* stop the timer */
	check(16, timer_ticks == 3, "three APIC timer interrupts (sti; hlt)");
	uint8_t status_b = cmos(0x0b);
	check(13, (status_b & 0x02) && cmos(0x0e) == 0 && (cmos(0x0a) & 0x80) == 0, "CMOS status registers");
	puts("RTC year (BCD): ");
	puthex(cmos(0x09));
	puts("\n");
	outl(0xcf8, 0x80000000);
	check(14, inl(0xcfc) == 0xffffffff, "PCI 00:00.0: no device");

	if (failed) {
		puts("some checks failed\n");
		return 0x40 + failed;
	}
	puts("all checks passed\n");
	return exit_code(cmdline);
}
