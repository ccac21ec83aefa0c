//! External mappers against a fake VFIO container: map, unmap, replay on attach, removal on
//! detach, rollback on failure, entry limit.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::*;
use virtio_iommu::{
    EndpointConfig, ExternalMapper, IommuConfig, MapPerms, MapperError, Status, VirtioIommu,
};

/// A container: IOVA -> (gpa, size). Fails when full, or when told to fail a call.
#[derive(Default)]
struct FakeContainer {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    maps: BTreeMap<u64, (u64, u64)>,
    limit: Option<usize>,
    fail_map_at: Option<u64>,
    fail_unmap_at: Option<u64>,
    /// Unmaps still to refuse, whatever the range.
    refuse_unmaps: usize,
    fail_identity: bool,
    identity: bool,
    calls: usize,
}

impl FakeContainer {
    fn with_limit(limit: usize) -> Arc<Self> {
        let c = Arc::new(FakeContainer::default());
        c.inner.lock().unwrap().limit = Some(limit);
        c
    }
    fn contents(&self) -> Vec<(u64, u64, u64)> {
        let i = self.inner.lock().unwrap();
        i.maps.iter().map(|(&k, &(g, s))| (k, g, s)).collect()
    }
    fn fail_map_at(&self, iova: Option<u64>) {
        self.inner.lock().unwrap().fail_map_at = iova;
    }
    fn fail_unmap_at(&self, iova: Option<u64>) {
        self.inner.lock().unwrap().fail_unmap_at = iova;
    }
    fn refuse_unmaps(&self, count: usize) {
        self.inner.lock().unwrap().refuse_unmaps = count;
    }
    fn identity(&self) -> bool {
        self.inner.lock().unwrap().identity
    }
    fn fail_identity(&self, fail: bool) {
        self.inner.lock().unwrap().fail_identity = fail;
    }
    fn calls(&self) -> usize {
        self.inner.lock().unwrap().calls
    }
}

impl ExternalMapper for FakeContainer {
    fn map(&self, iova: u64, gpa: u64, size: u64, _perms: MapPerms) -> Result<(), MapperError> {
        let mut i = self.inner.lock().unwrap();
        i.calls += 1;
        if i.fail_map_at == Some(iova) {
            return Err(MapperError::Failed("injected".into()));
        }
        if i.limit.is_some_and(|l| i.maps.len() >= l) {
            return Err(MapperError::NoResources);
        }
        assert!(!i.identity, "domain mapping while identity-mapped");
        assert!(
            i.maps.insert(iova, (gpa, size)).is_none(),
            "double map {iova:#x}"
        );
        Ok(())
    }
    fn set_identity(&self, enabled: bool) -> Result<(), MapperError> {
        let mut i = self.inner.lock().unwrap();
        i.calls += 1;
        if i.fail_identity {
            return Err(MapperError::Failed("injected".into()));
        }
        assert_ne!(i.identity, enabled, "redundant identity call");
        assert!(
            i.maps.is_empty(),
            "identity map while domain mappings exist"
        );
        i.identity = enabled;
        Ok(())
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), MapperError> {
        let mut i = self.inner.lock().unwrap();
        i.calls += 1;
        if i.fail_unmap_at == Some(iova) {
            return Err(MapperError::Failed("injected".into()));
        }
        if i.refuse_unmaps > 0 {
            i.refuse_unmaps -= 1;
            return Err(MapperError::Failed("injected".into()));
        }
        let (_, s) = i.maps.remove(&iova).expect("unmap of unknown range");
        assert_eq!(s, size);
        Ok(())
    }
}

fn with_mapper(d: &VirtioIommu, ep: u32, c: &Arc<FakeContainer>) {
    d.add_endpoint(
        ep,
        EndpointConfig {
            reserved_regions: None,
            mapper: Some(c.clone()),
        },
    )
    .unwrap();
}

#[test]
fn map_unmap_are_mirrored() {
    let d = device();
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x2fff, 0x8000, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x4000, 0x4fff, 0xa000, RW), Status::Ok);
    assert_eq!(
        c.contents(),
        vec![(0x1000, 0x8000, 0x2000), (0x4000, 0xa000, 0x1000)]
    );
    assert_eq!(unmap(&d, 1, 0, 0x3fff), Status::Ok);
    assert_eq!(c.contents(), vec![(0x4000, 0xa000, 0x1000)]);
    // A failed UNMAP (split) does not touch the container.
    assert_eq!(map(&d, 1, 0x10000, 0x1ffff, 0, RW), Status::Ok);
    let calls = c.calls();
    assert_eq!(unmap(&d, 1, 0x10000, 0x10fff), Status::Range);
    assert_eq!(c.calls(), calls);
}

#[test]
fn replay_on_attach_and_removal_on_detach() {
    let d = device();
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x8000, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x2000, 0x2fff, 0x9000, RW), Status::Ok);
    assert!(c.contents().is_empty());
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(c.contents().len(), 2, "replayed");
    assert_eq!(detach(&d, 1, 10), Status::Ok);
    assert!(c.contents().is_empty(), "withdrawn on detach");
    assert_eq!(
        d.domain_mappings(1).unwrap().len(),
        2,
        "domain keeps its mappings"
    );
}

#[test]
fn shared_container_is_mapped_once() {
    // Bypass is mirrored per endpoint, so a shared container is only used without it.
    let d = device_with(IommuConfig {
        boot_bypass: false,
        ..Default::default()
    });
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    with_mapper(&d, 11, &c);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(attach(&d, 1, 11), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x8000, RW), Status::Ok);
    assert_eq!(c.contents().len(), 1);
    assert_eq!(detach(&d, 1, 10), Status::Ok);
    assert_eq!(c.contents().len(), 1, "still used by endpoint 11");
    assert_eq!(detach(&d, 1, 11), Status::Ok);
    assert!(c.contents().is_empty());
}

#[test]
fn attach_move_switches_container_contents() {
    let d = device();
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 2, 1), Status::Ok);
    assert_eq!(map(&d, 2, 0x5000, 0x5fff, 0xb000, RW), Status::Ok);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x8000, RW), Status::Ok);
    assert_eq!(attach(&d, 2, 10), Status::Ok);
    assert_eq!(c.contents(), vec![(0x5000, 0xb000, 0x1000)]);
}

#[test]
fn failures_roll_back() {
    let d = device();
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x8000, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x2000, 0x2fff, 0x9000, RW), Status::Ok);

    // MAP failing in the mapper: not mapped in the model either.
    c.fail_map_at(Some(0x3000));
    assert_eq!(map(&d, 1, 0x3000, 0x3fff, 0xa000, RW), Status::DevErr);
    assert_eq!(d.domain_mappings(1).unwrap().len(), 2);

    // UNMAP of two mappings where the second fails: the first is re-mapped, both stay.
    c.fail_unmap_at(Some(0x2000));
    assert_eq!(unmap(&d, 1, 0x1000, 0x2fff), Status::DevErr);
    assert_eq!(d.domain_mappings(1).unwrap().len(), 2);
    assert_eq!(c.contents().len(), 2);

    // DETACH failing to withdraw: stays attached, container intact.
    assert_eq!(detach(&d, 1, 10), Status::DevErr);
    assert_eq!(d.endpoint_domain(10), Some(1));
    assert_eq!(c.contents().len(), 2);
    // Hot-unplug is refused the same way.
    assert_eq!(
        d.remove_endpoint(10),
        Err(virtio_iommu::ConfigError::MapperRefused(10))
    );
    // ATTACH-move failing to withdraw the old domain: nothing changes.
    assert_eq!(attach(&d, 2, 10), Status::DevErr);
    assert_eq!(d.endpoint_domain(10), Some(1));
    assert_eq!(d.domain_count(), 1);
    c.fail_unmap_at(None);

    // Replay failing on ATTACH to a populated domain: the old domain is restored in the
    // container and the endpoint stays where it was.
    assert_eq!(attach(&d, 3, 1), Status::Ok);
    assert_eq!(map(&d, 3, 0x7000, 0x7fff, 0xc000, RW), Status::Ok);
    c.fail_map_at(Some(0x7000));
    assert_eq!(attach(&d, 3, 10), Status::DevErr);
    assert_eq!(d.endpoint_domain(10), Some(1));
    assert_eq!(
        c.contents(),
        vec![(0x1000, 0x8000, 0x1000), (0x2000, 0x9000, 0x1000)]
    );
}

#[test]
fn mapper_limit_gives_nomem() {
    let d = device();
    let c = FakeContainer::with_limit(2);
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x2000, 0x2fff, 0, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x3000, 0x3fff, 0, RW), Status::NoMem);
    assert_eq!(d.domain_mappings(1).unwrap().len(), 2);
    // Replay into a container that cannot hold the domain: NOMEM and nothing left behind.
    let small = FakeContainer::with_limit(1);
    with_mapper(&d, 11, &small);
    assert_eq!(attach(&d, 1, 11), Status::NoMem);
    assert!(small.contents().is_empty());
    assert_eq!(d.endpoint_domain(11), None);
}

#[test]
fn reset_and_removal_withdraw_mappings() {
    let d = device_with(IommuConfig::default());
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    d.reset();
    assert!(c.contents().is_empty());
    assert_eq!(d.domain_count(), 0);
    d.ack_features(d.features());
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    d.remove_endpoint(10).unwrap();
    assert!(c.contents().is_empty());
    assert_eq!(attach(&d, 1, 10), Status::NoEnt);
}

/// A mapper that refuses a withdraw on reset now and then is asked again: the reset still
/// leaves the container empty and back on the boot-bypass identity map.
#[test]
fn reset_retries_a_refused_withdraw() {
    let d = device_with(IommuConfig::default());
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    c.refuse_unmaps(2);
    d.reset();
    assert!(c.contents().is_empty());
    assert!(c.identity());
    assert_eq!(d.domain_count(), 0);
}

/// A mapper that keeps refusing on reset: the domain goes (reset must not be held hostage),
/// but the mappings the host still has stay on record. The endpoint gets no identity map
/// beside them, no domain (DEVERR) and no removal while they remain; once the mapper lets
/// go, the next ATTACH withdraws them first and everything works again.
#[test]
fn a_mapper_refusing_on_reset_keeps_its_mappings_on_record() {
    let d = device_with(IommuConfig::default());
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0x8000, RW), Status::Ok);
    assert_eq!(map(&d, 1, 0x4000, 0x4fff, 0x9000, RW), Status::Ok);
    c.fail_unmap_at(Some(0x1000));
    d.reset();
    assert_eq!(d.domain_count(), 0);
    assert_eq!(d.endpoint_domain(10), None);
    // The non-transactional retry removed what the mapper let go of; the rest is on record.
    assert_eq!(c.contents(), vec![(0x1000, 0x8000, 0x1000)]);
    assert!(!c.identity(), "no identity map beside leftover mappings");

    d.ack_features(d.features());
    assert_eq!(attach(&d, 2, 10), Status::DevErr);
    assert_eq!(d.endpoint_domain(10), None);
    assert_eq!(
        d.remove_endpoint(10),
        Err(virtio_iommu::ConfigError::MapperRefused(10))
    );
    d.reset();
    assert_eq!(c.contents(), vec![(0x1000, 0x8000, 0x1000)]);

    c.fail_unmap_at(None);
    d.ack_features(d.features());
    assert_eq!(attach(&d, 2, 10), Status::Ok);
    assert!(c.contents().is_empty() && !c.identity());
    assert_eq!(map(&d, 2, 0x1000, 0x1fff, 0x8000, RW), Status::Ok);
    assert_eq!(c.contents(), vec![(0x1000, 0x8000, 0x1000)]);
    d.remove_endpoint(10).unwrap();
    assert!(c.contents().is_empty() && !c.identity());
}

/// A stuck endpoint recovers at the next reset too, which then gives it the identity map
/// boot bypass asks for.
#[test]
fn a_later_reset_withdraws_leftover_mappings() {
    let d = device_with(IommuConfig::default());
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    c.fail_unmap_at(Some(0x1000));
    d.reset();
    assert_eq!(c.contents().len(), 1);
    c.fail_unmap_at(None);
    d.reset();
    assert!(c.contents().is_empty());
    assert!(c.identity());
}

#[test]
fn bypass_mode_is_mirrored_as_identity_map() {
    use virtio_iommu::protocol::{CONFIG_BYPASS_OFFSET, VIRTIO_IOMMU_ATTACH_F_BYPASS};
    let d = device();
    let c = Arc::new(FakeContainer::default());
    with_mapper(&d, 10, &c);
    assert!(c.identity(), "boot bypass: unattached endpoint reaches RAM");
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert!(!c.identity());
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    assert_eq!(detach(&d, 1, 10), Status::Ok);
    assert!(c.identity() && c.contents().is_empty());
    d.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    assert!(!c.identity(), "driver cleared bypass");
    assert_eq!(
        attach_flags(&d, 2, 10, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Ok
    );
    assert!(c.identity(), "bypass domain");
    assert_eq!(detach(&d, 2, 10), Status::Ok);
    assert!(!c.identity());

    // Failing to leave bypass rolls the ATTACH back, replay included.
    assert_eq!(attach(&d, 1, 1), Status::Ok);
    assert_eq!(map(&d, 1, 0x1000, 0x1fff, 0, RW), Status::Ok);
    assert_eq!(
        attach_flags(&d, 2, 10, VIRTIO_IOMMU_ATTACH_F_BYPASS),
        Status::Ok
    );
    c.fail_identity(true);
    assert_eq!(attach(&d, 1, 10), Status::DevErr);
    assert_eq!(d.endpoint_domain(10), Some(2));
    assert!(c.identity() && c.contents().is_empty());
    c.fail_identity(false);
    assert_eq!(attach(&d, 1, 10), Status::Ok);
    assert_eq!(c.contents().len(), 1);
    // Hot-unplug leaves nothing behind.
    d.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    d.remove_endpoint(10).unwrap();
    assert!(!c.identity() && c.contents().is_empty());
}

#[test]
fn registration_under_boot_bypass_needs_the_identity_map() {
    let d = device();
    let c = Arc::new(FakeContainer::default());
    c.fail_identity(true);
    let r = d.add_endpoint(
        12,
        EndpointConfig {
            reserved_regions: None,
            mapper: Some(c.clone()),
        },
    );
    assert_eq!(r, Err(virtio_iommu::ConfigError::MapperRefused(12)));
    assert_eq!(attach(&d, 1, 12), Status::NoEnt);
}
