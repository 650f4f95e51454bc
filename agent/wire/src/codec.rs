//! The protobuf codec of every generated service and client: tonic-prost's encoder and
//! decoder, with smaller starting buffers.
//!
//! A call holds an encode and a decode buffer for as long as it is open. tonic's default, 8 KiB
//! each, made each of the controller's control channels (streams open for hours, one per host)
//! cost 16 KiB before its first message. These start at 1 KiB and grow to fit any message
//! (a full inventory grows its call's buffer to its size).

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial buffer per direction of a call.
pub const INITIAL_BUFFER: usize = 1024;

/// How much an encoder buffers before it yields to the transport (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

/// `application/grpc+proto` with [`INITIAL_BUFFER`]-sized buffers; named by build.rs
/// (`codec_path`) for all generated code.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
