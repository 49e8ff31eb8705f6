//! quire-queue
