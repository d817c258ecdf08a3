//! DevicePagePool (see issue 6).
