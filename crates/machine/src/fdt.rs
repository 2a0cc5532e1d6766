//! The flattened device tree handed to the kernel, generated from the
//! board's layout constants (bindings as QEMU `virt` uses them).

use crate::layout::*;
use crate::plic::NSRC;

const CPU_INTC_PHANDLE: u32 = 1;
const PLIC_PHANDLE: u32 = 2;
/// RISC-V local interrupt numbers used in `interrupts-extended`.
const IRQ_M_SOFT: u32 = 3;
const IRQ_M_TIMER: u32 = 7;
const IRQ_S_EXT: u32 = 9;
const IRQ_M_EXT: u32 = 11;

/// The extensions the hart implements, as the kernel reads them.
pub const ISA_EXTENSIONS: &[&str] = &["i", "m", "a", "f", "d", "c", "zicntr", "zicsr", "zifencei", "sstc"];

/// What the kernel is told beyond the fixed board.
#[derive(Clone, Debug, Default)]
pub struct FdtConfig {
    pub mem_bytes: u64,
    pub bootargs: String,
    /// Physical start and end of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// Bytes for `/chosen/rng-seed`: the kernel credits them as entropy,
    /// so it need not grind timer jitter for it (QEMU `virt` passes 32).
    pub rng_seed: Option<Vec<u8>>,
    /// Number of virtio-mmio slots in use (from slot 0).
    pub virtio_slots: usize,
}

fn reg(base: u64, size: u64) -> [u64; 2] {
    [base, size]
}

/// Build the DTB.
pub fn build(cfg: &FdtConfig) -> Result<Vec<u8>, vm_fdt::Error> {
    let mut f = vm_fdt::FdtWriter::new()?;
    let root = f.begin_node("")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_string("compatible", "riscv-virtio")?;
    f.property_string("model", "lockstep,virt")?;

    let chosen = f.begin_node("chosen")?;
    f.property_string("bootargs", &cfg.bootargs)?;
    f.property_string("stdout-path", &format!("/soc/serial@{UART0_BASE:x}"))?;
    if let Some((start, end)) = cfg.initrd {
        f.property_u64("linux,initrd-start", start)?;
        f.property_u64("linux,initrd-end", end)?;
    }
    if let Some(seed) = &cfg.rng_seed {
        f.property("rng-seed", seed)?;
    }
    f.end_node(chosen)?;

    let mem = f.begin_node(&format!("memory@{RAM_BASE:x}"))?;
    f.property_string("device_type", "memory")?;
    f.property_array_u64("reg", &reg(RAM_BASE, cfg.mem_bytes))?;
    f.end_node(mem)?;

    let cpus = f.begin_node("cpus")?;
    f.property_u32("#address-cells", 1)?;
    f.property_u32("#size-cells", 0)?;
    f.property_u32("timebase-frequency", TIMEBASE_HZ as u32)?;
    let cpu = f.begin_node("cpu@0")?;
    f.property_string("device_type", "cpu")?;
    f.property_u32("reg", 0)?;
    f.property_string("status", "okay")?;
    f.property_string("compatible", "riscv")?;
    let isa_str = format!("rv64imafdc_{}", ISA_EXTENSIONS[6..].join("_"));
    f.property_string("riscv,isa", &isa_str)?;
    f.property_string("riscv,isa-base", "rv64i")?;
    f.property_string_list("riscv,isa-extensions", ISA_EXTENSIONS.iter().map(|s| s.to_string()).collect())?;
    f.property_string("mmu-type", "riscv,sv48")?;
    let intc = f.begin_node("interrupt-controller")?;
    f.property_u32("#interrupt-cells", 1)?;
    f.property_null("interrupt-controller")?;
    f.property_string("compatible", "riscv,cpu-intc")?;
    f.property_phandle(CPU_INTC_PHANDLE)?;
    f.end_node(intc)?;
    f.end_node(cpu)?;
    f.end_node(cpus)?;

    let soc = f.begin_node("soc")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_string("compatible", "simple-bus")?;
    f.property_null("ranges")?;

    let clint = f.begin_node(&format!("clint@{CLINT_BASE:x}"))?;
    f.property_string_list("compatible", vec!["sifive,clint0".into(), "riscv,clint0".into()])?;
    f.property_array_u64("reg", &reg(CLINT_BASE, CLINT_SIZE))?;
    f.property_array_u32("interrupts-extended", &[CPU_INTC_PHANDLE, IRQ_M_SOFT, CPU_INTC_PHANDLE, IRQ_M_TIMER])?;
    f.end_node(clint)?;

    let plic = f.begin_node(&format!("plic@{PLIC_BASE:x}"))?;
    f.property_string_list("compatible", vec!["sifive,plic-1.0.0".into(), "riscv,plic0".into()])?;
    f.property_array_u64("reg", &reg(PLIC_BASE, PLIC_SIZE))?;
    f.property_u32("#address-cells", 0)?;
    f.property_u32("#interrupt-cells", 1)?;
    f.property_null("interrupt-controller")?;
    f.property_u32("riscv,ndev", NSRC as u32)?;
    f.property_array_u32("interrupts-extended", &[CPU_INTC_PHANDLE, IRQ_M_EXT, CPU_INTC_PHANDLE, IRQ_S_EXT])?;
    f.property_phandle(PLIC_PHANDLE)?;
    f.end_node(plic)?;

    let uart = f.begin_node(&format!("serial@{UART0_BASE:x}"))?;
    f.property_string("compatible", "ns16550a")?;
    f.property_array_u64("reg", &reg(UART0_BASE, UART0_SIZE))?;
    f.property_u32("clock-frequency", 3_686_400)?;
    f.property_u32("interrupt-parent", PLIC_PHANDLE)?;
    f.property_u32("interrupts", UART0_IRQ as u32)?;
    f.end_node(uart)?;

    for i in 0..cfg.virtio_slots {
        let base = VIRTIO_BASE + i as u64 * VIRTIO_SIZE;
        let node = f.begin_node(&format!("virtio_mmio@{base:x}"))?;
        f.property_string("compatible", "virtio,mmio")?;
        f.property_array_u64("reg", &reg(base, VIRTIO_SIZE))?;
        f.property_u32("interrupt-parent", PLIC_PHANDLE)?;
        f.property_u32("interrupts", (VIRTIO_IRQ + i) as u32)?;
        f.end_node(node)?;
    }

    f.end_node(soc)?;
    f.end_node(root)?;
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtb_has_header_and_the_nodes_linux_needs() {
        let cfg = FdtConfig {
            mem_bytes: 512 << 20,
            bootargs: "console=ttyS0".into(),
            initrd: Some((0x8800_0000, 0x8810_0000)),
            rng_seed: Some(b"0123456789abcdef0123456789abcdef".to_vec()),
            virtio_slots: 1,
        };
        let dtb = build(&cfg).unwrap();
        assert_eq!(&dtb[0..4], &[0xd0, 0x0d, 0xfe, 0xed], "FDT magic");
        let total = u32::from_be_bytes(dtb[4..8].try_into().unwrap()) as usize;
        assert_eq!(total, dtb.len());
        assert!((total as u64) < FDT_MAX_SIZE);
        let text = String::from_utf8_lossy(&dtb);
        for needle in [
            "rng-seed",
            "0123456789abcdef",
            "virtio_mmio@10001000",
            "console=ttyS0",
            "ns16550a",
            "riscv,plic0",
            "riscv,cpu-intc",
            "sstc",
            "linux,initrd-start",
            "memory@80000000",
            "serial@10000000",
        ] {
            assert!(text.contains(needle), "missing {needle}");
        }
    }
}
