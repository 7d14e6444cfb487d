//! Where frames come from. Only pcap/pcapng files so far; live sources
//! (tc maps, AF_PACKET) will sit beside them.

pub mod file;
