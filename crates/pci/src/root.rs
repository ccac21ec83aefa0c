//! The root bus: devices by device number, and the two ways the guest reaches their
//! configuration space.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use log::debug;
use vm_device::BusDevice;

use crate::{BarMove, PciConfiguration, PciDevice, PciError, PciHeader};
use vm_device::lock;

/// Device numbers per bus.
pub const MAX_DEVICES: u8 = 32;
/// ECAM window per bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The host bridge reuses the IDs Cloud Hypervisor gives its bridge (an Intel ID with no driver
/// quirks attached), so guests treat it as a plain host bridge.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;

const EXTENDED_CONFIG_REGS: usize = 4096 / 4;
const CONVENTIONAL_CONFIG_REGS: usize = crate::CONFIG_SPACE_SIZE / 4;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Enable, extended register (bits 27:24, the AMD extension Linux uses for registers past 255
/// when there is no ECAM), bus, device, function and register bits; the rest read as zero.
const CONFIG_ADDRESS_MASK: u32 = 0x8fff_fffc;

/// The host bridge at 00:00.0: a header with no BARs, there so guests find a root complex.
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                class: 0x06,
                subclass: 0x00,
                ..PciHeader::default()
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        debug!("host bridge has no BAR {bar} (read at {offset:#x})");
        data.fill(0xff);
    }
    fn write_bar(&mut self, bar: usize, offset: u64, _data: &[u8]) {
        debug!("host bridge has no BAR {bar} (write at {offset:#x})");
    }
}

/// Follows the guest's BAR placements: the VMM side of moving a BAR's bus range.
pub trait BarMoves: Send + Sync {
    /// The guest enabled decoding of `device_number`'s BARs at `moves`' new addresses (called
    /// with the bus's lock held, and not the device's).
    fn moved(&self, device_number: u8, device: &Arc<Mutex<dyn PciDevice>>, moves: &[BarMove]);
}

/// Bus 0: single-function devices by device number, the host bridge at 0.
///
/// BARs stay where the VMM placed them, unless a [`BarMoves`] handler follows the guest's
/// placements: without one, a guest moving a BAR while decoding is on gets a (rate-limited)
/// warning from the device's configuration and the BAR's bus range is not moved. Nothing is
/// queued, so a guest rewriting BARs in a loop costs no host memory.
pub struct PciRoot {
    devices: BTreeMap<u8, Arc<Mutex<dyn PciDevice>>>,
    moves: Option<Arc<dyn BarMoves>>,
}

impl PciRoot {
    /// A bus holding only the host bridge at device 0.
    pub fn new() -> Self {
        let bridge: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(HostBridge::new()));
        Self {
            devices: BTreeMap::from([(0, bridge)]),
            moves: None,
        }
    }

    /// Has `handler` follow the BARs the guest moves from now on.
    pub fn set_bar_moves(&mut self, handler: Arc<dyn BarMoves>) {
        self.moves = Some(handler);
    }

    /// Unplugs every device but the host bridge and forgets the BAR handler: the end of the
    /// machine, which lets go of what the devices and the handler hold.
    pub fn clear(&mut self) {
        self.devices.retain(|&device_number, _| device_number == 0);
        self.moves = None;
    }

    /// Unplugs the device at `device_number` (never the host bridge); returns it.
    pub fn remove_device(&mut self, device_number: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        if device_number == 0 {
            return None;
        }
        self.devices.remove(&device_number)
    }

    /// Plugs `device` in as function 0 of `device_number`.
    pub fn add_device(
        &mut self,
        device_number: u8,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciError> {
        if device_number >= MAX_DEVICES {
            return Err(PciError::DeviceNumberInvalid(device_number));
        }
        if self.devices.contains_key(&device_number) {
            return Err(PciError::DeviceNumberInUse(device_number));
        }
        self.devices.insert(device_number, device);
        Ok(())
    }

    /// The device at `device_number`, if any.
    pub fn device(&self, device_number: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        self.devices.get(&device_number)
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(&device)
    }

    /// Reads config register `reg_idx` (0..1024) of a function; absent functions read all-ones
    /// and the extended space of present ones reads zero.
    pub fn read_config(&self, bus: u8, device: u8, function: u8, reg_idx: usize) -> u32 {
        match self.function(bus, device, function) {
            None => u32::MAX,
            Some(_) if reg_idx >= EXTENDED_CONFIG_REGS => u32::MAX,
            Some(_) if reg_idx >= CONVENTIONAL_CONFIG_REGS => 0,
            Some(dev) => lock(dev).read_config_register(reg_idx),
        }
    }

    /// Writes `data` at byte `offset` of config register `reg_idx` of a function; writes to
    /// absent functions and to the extended space are dropped.
    pub fn write_config(
        &mut self,
        bus: u8,
        device: u8,
        function: u8,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) {
        if reg_idx >= CONVENTIONAL_CONFIG_REGS {
            return;
        }
        let Some(dev) = self.function(bus, device, function) else {
            return;
        };
        let moves = lock(dev).write_config_register(reg_idx, offset, data);
        if let (false, Some(handler)) = (moves.is_empty(), &self.moves) {
            handler.moved(device, dev, &moves);
        }
    }

    /// A sub-dword read; accesses of odd sizes or crossing a dword read all-ones.
    fn read_bytes(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: usize, data: &mut [u8]) {
        if !is_valid_access(offset, data.len()) {
            debug!("bad config read of {} bytes at offset {offset}", data.len());
            data.fill(0xff);
            return;
        }
        let value = self.read_config(bus, dev, func, reg).to_le_bytes();
        data.copy_from_slice(&value[offset..offset + data.len()]);
    }

    fn write_bytes(&mut self, bus: u8, dev: u8, func: u8, reg: usize, offset: usize, data: &[u8]) {
        if !is_valid_access(offset, data.len()) {
            debug!(
                "bad config write of {} bytes at offset {offset}",
                data.len()
            );
            return;
        }
        self.write_config(bus, dev, func, reg, offset as u64, data);
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

fn is_valid_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) && offset + len <= 4
}

/// The legacy configuration mechanism: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC..0xCFF.
/// Register it on the port bus at 0xCF8 with length 8.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    /// (bus, device, function, register) selected by CONFIG_ADDRESS, if enabled.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        (a & CONFIG_ADDRESS_ENABLE != 0).then_some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (((a >> 16) & 0xf00 | a & 0xfc) >> 2) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (4..=7, _) => match self.target() {
                Some((bus, dev, func, reg)) => {
                    lock(&self.root).read_bytes(bus, dev, func, reg, offset as usize - 4, data)
                }
                None => data.fill(0xff),
            },
            // Only dword accesses reach CONFIG_ADDRESS; narrower ones belong to other
            // chipset registers (0xCF9 reset) that we do not model.
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let value = u32::from_le_bytes(data.try_into().unwrap());
                self.address = value & CONFIG_ADDRESS_MASK;
            }
            (4..=7, _) => {
                if let Some((bus, dev, func, reg)) = self.target() {
                    lock(&self.root).write_bytes(bus, dev, func, reg, offset as usize - 4, data);
                }
            }
            _ => debug!("ignoring {}-byte write at 0xcf8+{offset}", data.len()),
        }
    }
}

/// ECAM: configuration space memory-mapped at `bus << 20 | device << 15 | function << 12 |
/// register`. Register it on the MMIO bus with [`ECAM_BUS_SIZE`] bytes per bus.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }
}

fn decode_ecam(offset: u64) -> (u8, u8, u8, usize, usize) {
    (
        ((offset >> 20) & 0xff) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        ((offset & 0xfff) >> 2) as usize,
        (offset & 0x3) as usize,
    )
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= 256 * ECAM_BUS_SIZE {
            data.fill(0xff);
            return;
        }
        let (bus, dev, func, reg, byte) = decode_ecam(offset);
        lock(&self.root).read_bytes(bus, dev, func, reg, byte, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= 256 * ECAM_BUS_SIZE {
            return;
        }
        let (bus, dev, func, reg, byte) = decode_ecam(offset);
        lock(&self.root).write_bytes(bus, dev, func, reg, byte, data);
    }
}

/// One BAR of a device as a bus range: the VMM inserts it on the MMIO bus at the BAR's base.
pub struct PciBarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

impl PciBarRegion {
    pub fn new(device: Arc<Mutex<dyn PciDevice>>, bar: usize) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for PciBarRegion {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{BarKind, BarSpec, COMMAND_MEMORY_SPACE};

    /// A device with one 32-bit BAR that records BAR accesses.
    pub(crate) struct TestDevice {
        pub(crate) config: PciConfiguration,
        pub(crate) bar_writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl TestDevice {
        pub(crate) fn new(device_id: u16, bars: &[(usize, BarSpec)]) -> Self {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1234,
                device_id,
                class: 0xff,
                ..PciHeader::default()
            });
            for &(index, spec) in bars {
                config.add_bar(index, spec).unwrap();
            }
            Self {
                config,
                bar_writes: Vec::new(),
            }
        }
    }

    impl PciDevice for TestDevice {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 * 0x10 + offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.bar_writes.push((bar, offset, data.to_vec()));
        }
    }

    const BAR32: BarSpec = BarSpec {
        size: 0x1000,
        kind: BarKind::Memory32,
        prefetchable: false,
    };

    fn root_with_device() -> (Arc<Mutex<PciRoot>>, Arc<Mutex<TestDevice>>) {
        let device = Arc::new(Mutex::new(TestDevice::new(0x5678, &[(0, BAR32)])));
        device
            .lock()
            .unwrap()
            .config
            .set_bar_address(0, 0xc000_0000)
            .unwrap();
        let mut root = PciRoot::new();
        root.add_device(3, device.clone()).unwrap();
        (Arc::new(Mutex::new(root)), device)
    }

    fn io_read(io: &mut PciConfigIo, port: u64, len: usize) -> u32 {
        let mut data = [0u8; 4];
        io.read(0xcf8, port - 0xcf8, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn io_write(io: &mut PciConfigIo, port: u64, value: u32, len: usize) {
        io.write(0xcf8, port - 0xcf8, &value.to_le_bytes()[..len]);
    }

    fn cf8(dev: u32, func: u32, reg_offset: u32) -> u32 {
        0x8000_0000 | dev << 11 | func << 8 | reg_offset
    }

    #[test]
    fn host_bridge_is_at_device_zero() {
        let root = PciRoot::new();
        assert_eq!(root.read_config(0, 0, 0, 0), 0x0d57_8086);
        assert_eq!(root.read_config(0, 0, 0, 2) >> 16, 0x0600);
        assert_eq!(root.read_config(0, 0, 0, 3) >> 16 & 0xff, 0);
    }

    /// Records the moves it is told of.
    struct MoveLog(Arc<Mutex<Vec<(u8, BarMove)>>>);

    impl BarMoves for MoveLog {
        fn moved(&self, device_number: u8, _device: &Arc<Mutex<dyn PciDevice>>, moves: &[BarMove]) {
            let mut log = self.0.lock().unwrap();
            log.extend(moves.iter().map(|m| (device_number, *m)));
        }
    }

    #[test]
    fn moves_reach_the_handler_and_removed_devices_read_all_ones() {
        let device = Arc::new(Mutex::new(TestDevice::new(0x5678, &[(0, BAR32)])));
        let mut root = PciRoot::new();
        root.add_device(24, device.clone()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        root.set_bar_moves(Arc::new(MoveLog(log.clone())));
        // The guest places the never-placed BAR, then turns memory decoding on.
        root.write_config(0, 24, 0, 4, 0, &0xc000_2000u32.to_le_bytes());
        assert!(log.lock().unwrap().is_empty(), "decoding is still off");
        root.write_config(0, 24, 0, 1, 0, &[crate::COMMAND_MEMORY_SPACE as u8]);
        assert_eq!(
            *log.lock().unwrap(),
            [(
                24,
                BarMove {
                    bar: 0,
                    old_base: 0,
                    new_base: 0xc000_2000,
                    len: 0x1000
                }
            )]
        );
        assert!(root.remove_device(0).is_none(), "the host bridge stays");
        assert!(root.remove_device(24).is_some());
        assert!(root.remove_device(24).is_none());
        assert_eq!(root.read_config(0, 24, 0, 0), u32::MAX, "an empty slot");
        root.add_device(24, device).unwrap();
    }

    #[test]
    fn add_device_checks_number() {
        let mut root = PciRoot::new();
        let dev = || -> Arc<Mutex<dyn PciDevice>> { Arc::new(Mutex::new(TestDevice::new(1, &[]))) };
        assert_eq!(
            root.add_device(0, dev()),
            Err(PciError::DeviceNumberInUse(0))
        );
        assert_eq!(
            root.add_device(32, dev()),
            Err(PciError::DeviceNumberInvalid(32))
        );
        root.add_device(31, dev()).unwrap();
        assert!(root.device(31).is_some());
        assert!(root.device(30).is_none());
    }

    #[test]
    fn cf8_address_register_and_enable_bit() {
        let (root, _) = root_with_device();
        let mut io = PciConfigIo::new(root);
        io_write(&mut io, 0xcf8, 0xffff_ffff, 4);
        assert_eq!(io_read(&mut io, 0xcf8, 4), 0x8fff_fffc);
        io_write(&mut io, 0xcf8, 0x8000_0000, 4);
        assert_eq!(io_read(&mut io, 0xcf8, 4), 0x8000_0000);
        // Byte writes (0xCFB, 0xCF9) do not change CONFIG_ADDRESS.
        io_write(&mut io, 0xcfb, 0x01, 1);
        io_write(&mut io, 0xcf9, 0x06, 1);
        assert_eq!(io_read(&mut io, 0xcf8, 4), 0x8000_0000);
        // Disabled: data reads all-ones even for present devices.
        io_write(&mut io, 0xcf8, cf8(3, 0, 0) & !0x8000_0000, 4);
        assert_eq!(io_read(&mut io, 0xcfc, 4), 0xffff_ffff);
        io_write(&mut io, 0xcf8, cf8(3, 0, 0), 4);
        assert_eq!(io_read(&mut io, 0xcfc, 4), 0x5678_1234);
    }

    #[test]
    fn cf8_sub_dword_and_absent_functions() {
        let (root, _) = root_with_device();
        let mut io = PciConfigIo::new(root);
        io_write(&mut io, 0xcf8, cf8(3, 0, 0), 4);
        assert_eq!(io_read(&mut io, 0xcfc, 2), 0x1234);
        assert_eq!(io_read(&mut io, 0xcfe, 2), 0x5678);
        assert_eq!(io_read(&mut io, 0xcff, 1), 0x56);
        assert_eq!(io_read(&mut io, 0xcfd, 2), 0xffff, "misaligned");
        io_write(&mut io, 0xcf8, cf8(3, 0, 0x10), 4);
        assert_eq!(io_read(&mut io, 0xcfc, 4), 0xc000_0000);
        // Extended register 0x110 (bits 27:24 = 1): zero, not an alias of register 0x10.
        io_write(&mut io, 0xcf8, cf8(3, 0, 0x10) | 1 << 24, 4);
        assert_eq!(io_read(&mut io, 0xcfc, 4), 0);
        for address in [cf8(4, 0, 0), cf8(3, 1, 0), cf8(3, 0, 0) | 1 << 16] {
            io_write(&mut io, 0xcf8, address, 4);
            assert_eq!(io_read(&mut io, 0xcfc, 4), 0xffff_ffff, "{address:#x}");
            assert_eq!(io_read(&mut io, 0xcfe, 2), 0xffff, "{address:#x}");
        }
    }

    #[test]
    fn cf8_writes_reach_device() {
        let (root, device) = root_with_device();
        let mut io = PciConfigIo::new(root);
        io_write(&mut io, 0xcf8, cf8(3, 0, 0x04), 4);
        io_write(&mut io, 0xcfc, u32::from(COMMAND_MEMORY_SPACE), 2);
        assert_eq!(
            device.lock().unwrap().config.command(),
            COMMAND_MEMORY_SPACE
        );
        io_write(&mut io, 0xcf8, cf8(3, 0, 0x10), 4);
        io_write(&mut io, 0xcfc, 0xd000_0000, 4);
        assert_eq!(io_read(&mut io, 0xcfc, 4), 0xd000_0000);
    }

    /// Each move reaches the device's configuration and nothing else: the root keeps no
    /// record of moves (it used to queue every one for a consumer that did not exist).
    #[test]
    fn guest_bar_moves_do_not_pile_up() {
        let (root, device) = root_with_device();
        let mut io = PciConfigIo::new(root);
        io_write(&mut io, 0xcf8, cf8(3, 0, 0x04), 4);
        io_write(&mut io, 0xcfc, u32::from(COMMAND_MEMORY_SPACE), 2);
        io_write(&mut io, 0xcf8, cf8(3, 0, 0x10), 4);
        for i in 0..1000u32 {
            io_write(&mut io, 0xcfc, 0xd000_0000 + (i % 2) * 0x1000, 4);
        }
        assert_eq!(device.lock().unwrap().config.read_reg(4), 0xd000_1000);
    }

    fn ecam_read(ecam: &mut PciConfigMmio, offset: u64, len: usize) -> u32 {
        let mut data = [0u8; 4];
        ecam.read(0xe000_0000, offset, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    #[test]
    fn ecam_decodes_device_function_and_register() {
        let (root, device) = root_with_device();
        let mut ecam = PciConfigMmio::new(root);
        let dev3 = 3 << 15;
        assert_eq!(ecam_read(&mut ecam, dev3, 4), 0x5678_1234);
        assert_eq!(ecam_read(&mut ecam, dev3 + 2, 2), 0x5678);
        assert_eq!(ecam_read(&mut ecam, dev3 + 0x10, 4), 0xc000_0000);
        assert_eq!(ecam_read(&mut ecam, 0, 4), 0x0d57_8086);
        // Absent device, other function, other bus.
        assert_eq!(ecam_read(&mut ecam, 4 << 15, 4), 0xffff_ffff);
        assert_eq!(ecam_read(&mut ecam, dev3 | 1 << 12, 4), 0xffff_ffff);
        assert_eq!(ecam_read(&mut ecam, dev3 | 1 << 20, 4), 0xffff_ffff);
        // Extended space of a present device reads zero and ignores writes.
        assert_eq!(ecam_read(&mut ecam, dev3 + 0x100, 4), 0);
        assert_eq!(ecam_read(&mut ecam, dev3 + 0xffc, 4), 0);
        ecam.write(0, dev3 + 0x100, &[0xff; 4]);
        assert_eq!(ecam_read(&mut ecam, dev3 + 0x100, 4), 0);
        // Crossing a dword or odd sizes: all-ones, writes dropped.
        assert_eq!(ecam_read(&mut ecam, dev3 + 3, 2), 0xffff);
        ecam.write(0, dev3 + 0x4, &[0xff; 8]);
        ecam.write(0, dev3 + 0x3, &[0xff, 0xff]);
        assert_eq!(device.lock().unwrap().config.command(), 0);
        ecam.write(0, dev3 + 0x4, &[0x02]);
        assert_eq!(device.lock().unwrap().config.command(), 0x2);
        let mut big = [0u8; 4];
        ecam.read(0, u64::MAX - 3, &mut big);
        assert_eq!(big, [0xff; 4]);
    }

    #[test]
    fn bar_region_forwards_relative_offsets() {
        let (_root, device) = root_with_device();
        let dyn_device: Arc<Mutex<dyn PciDevice>> = device.clone();
        let mut region = PciBarRegion::new(dyn_device, 0);
        let mut data = [0u8; 2];
        region.read(0xc000_0000, 4, &mut data);
        assert_eq!(data, [4, 4]);
        region.write(0xc000_0000, 8, &[1, 2]);
        assert_eq!(device.lock().unwrap().bar_writes, vec![(0, 8, vec![1, 2])]);
    }
}
