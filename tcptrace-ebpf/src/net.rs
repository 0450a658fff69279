//! Layouts of the network data the programs read or write: addresses, the IPv4 and IPv6
//! headers of a segment, and the `sockaddr_in`/`sockaddr_in6` of the reset tracepoint's
//! record. Offsets are in bytes.

/// Bytes of an IPv4 address.
pub(crate) const IPV4_ADDR_BYTES: u32 = 4;
/// Bytes of an IPv6 address, and of each address in an event (IPv4 is written mapped).
pub(crate) const IPV6_ADDR_BYTES: u32 = 16;
/// Bytes of a `u64`: the halves of an IPv6 address are loaded as two.
pub(crate) const U64_BYTES: usize = core::mem::size_of::<u64>();

/// Bytes 8 to 15 of an IPv4-mapped IPv6 address whose IPv4 address is 0.0.0.0, as a
/// little-endian `u64`: `ff ff` at bytes 10 and 11. OR the IPv4 address, shifted up 32 bits.
pub(crate) const V4_MAPPED_HIGH: u64 = 0xffff_0000;
/// Where the IPv4 address sits in its mapped IPv6 form (`::ffff:a.b.c.d`).
pub(crate) const V4_MAPPED_ADDR_OFFSET: usize = 12;

/// An IPv4 address (network order, as loaded) as the two words of its mapped IPv6 form.
#[inline(always)]
pub(crate) fn v4_mapped(a: u32) -> [u64; 2] {
    [0, V4_MAPPED_HIGH | (u64::from(a) << u32::BITS)]
}

/// The IP version is the high nibble of a header's first byte.
pub(crate) const IP_VERSION_SHIFT_BITS: u8 = 4;
pub(crate) const IPV4_VERSION: u8 = 4;
pub(crate) const IPV6_VERSION: u8 = 6;
/// The IPv4 header's source and destination addresses.
pub(crate) const IPV4_SADDR_OFFSET: u64 = 12;
pub(crate) const IPV4_DADDR_OFFSET: u64 = 16;
/// The IPv6 header's source and destination addresses.
pub(crate) const IPV6_SADDR_OFFSET: u64 = 8;
pub(crate) const IPV6_DADDR_OFFSET: u64 = 24;

/// `sin_port`/`sin6_port` (network order) in a `sockaddr_in`/`sockaddr_in6`; the family is
/// at 0.
pub(crate) const SOCKADDR_PORT_OFFSET: u16 = 2;
/// `sin_addr` in a `sockaddr_in`.
pub(crate) const SOCKADDR_IN_ADDR_OFFSET: usize = 4;
/// `sin6_addr` in a `sockaddr_in6`.
pub(crate) const SOCKADDR_IN6_ADDR_OFFSET: usize = 8;
