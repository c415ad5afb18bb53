//! virtio-blk: the device's features and config space, and parsing and
//! checking requests taken from a virtqueue.
