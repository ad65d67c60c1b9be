//! A chunked response body's decoder (RFC 9112 §7.1) with hyper's rules, state for state
//! (`hyper::proto::h1::decode`), so that what it accepts and refuses is what hyper's client
//! did before [`super`] replaced it for requests without a body. It consumes the read buffer
//! as it goes: no byte is looked at twice, however the body arrives, and only the trailer
//! section (at most 16 KiB) is kept.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::Frame;

use super::Error;

/// Most bytes of chunk extensions in a body (hyper's limit).
const EXTENSIONS_LIMIT: u64 = 16 * 1024;
/// Most bytes of a trailer section (hyper's limit).
const TRAILERS_LIMIT: usize = 16 * 1024;
/// Most trailer fields (hyper's, as for a head).
const MAX_TRAILERS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Before a chunk size's first hex digit.
    #[default]
    Start,
    /// In a chunk size's hex digits.
    Size,
    /// In spaces or tabs after the size.
    SizeLws,
    /// In a chunk extension (ignored) up to its CR.
    Extension,
    /// At the LF of a chunk-size line.
    SizeLf,
    /// In a chunk's data.
    Data,
    /// At the CRLF after a chunk's data.
    DataCr,
    DataLf,
    /// After the last chunk, at the start of a trailer line or the final CRLF.
    EndCr,
    EndLf,
    /// In a trailer line, up to its CR.
    Trailer,
    TrailerLf,
    /// The final CRLF was read; the trailers, if any, are still to be given.
    End,
    /// Everything was given.
    Done,
}

/// What a call to [`Decoder::decode`] gave.
pub(super) enum Decoded {
    /// A data frame, or the trailers.
    Frame(Frame<Bytes>),
    /// The body ended.
    End,
    /// More bytes are needed.
    More,
}

#[derive(Debug, Default)]
pub(super) struct Decoder {
    state: State,
    /// The chunk's size while its line is read, then its bytes left.
    size: u64,
    /// Chunk-extension bytes so far.
    extensions: u64,
    /// The trailer section so far, once it has a byte.
    trailers: Option<BytesMut>,
    trailer_lines: usize,
}

impl Decoder {
    /// Decodes from `read`, taking what it used.
    pub(super) fn decode(&mut self, read: &mut BytesMut) -> Result<Decoded, Error> {
        let mut used = 0;
        loop {
            match self.state {
                State::Data => {
                    read.advance(used);
                    if read.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = usize::try_from(self.size).unwrap_or(usize::MAX).min(read.len());
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok(Decoded::Frame(Frame::data(read.split_to(n).freeze())));
                }
                State::End => {
                    read.advance(used);
                    self.state = State::Done;
                    return match self.trailers.take() {
                        Some(section) => Ok(Decoded::Frame(Frame::trailers(trailers(&section, self.trailer_lines)?))),
                        None => Ok(Decoded::End),
                    };
                }
                State::Done => return Ok(Decoded::End),
                _ => {}
            }
            let Some(&byte) = read.get(used) else {
                read.advance(used);
                return Ok(Decoded::More);
            };
            used += 1;
            self.state = self.next(byte)?;
        }
    }

    /// The state after `byte`, in a chunk-size line, a data CRLF or the trailer section.
    fn next(&mut self, byte: u8) -> Result<State, Error> {
        let malformed = |what| Err(Error::Chunked(what));
        Ok(match (self.state, byte) {
            (State::Start | State::Size, _) if byte.is_ascii_hexdigit() => {
                let digit = u64::from(char::from(byte).to_digit(16).unwrap_or_default());
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|size| size.checked_add(digit))
                    .ok_or(Error::Chunked("chunk size overflows"))?;
                State::Size
            }
            (State::Start, _) => return malformed("chunk size line without a size"),
            (State::Size | State::SizeLws, b' ' | b'\t') => State::SizeLws,
            (State::Size | State::SizeLws, b';') => State::Extension,
            (State::Size | State::SizeLws | State::Extension, b'\r') => State::SizeLf,
            (State::Size | State::SizeLws, _) => return malformed("chunk size line"),
            (State::Extension, b'\n') => return malformed("chunk extension with a line feed"),
            (State::Extension, _) => {
                self.extensions += 1;
                if self.extensions >= EXTENSIONS_LIMIT {
                    return malformed("chunk extensions over 16 KiB");
                }
                State::Extension
            }
            (State::SizeLf, b'\n') if self.size == 0 => State::EndCr,
            (State::SizeLf, b'\n') => State::Data,
            (State::SizeLf, _) => return malformed("chunk size line without CRLF"),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Start,
            (State::DataCr | State::DataLf, _) => return malformed("chunk data not followed by CRLF"),
            (State::EndCr, b'\r') => {
                self.keep(byte)?;
                State::EndLf
            }
            (State::EndCr, _) => {
                match &mut self.trailers {
                    None => self.trailers = Some(BytesMut::from(&[byte][..])),
                    Some(_) => self.keep(byte)?,
                }
                State::Trailer
            }
            (State::Trailer, _) => {
                self.keep(byte)?;
                if byte == b'\r' {
                    State::TrailerLf
                } else {
                    State::Trailer
                }
            }
            (State::TrailerLf, b'\n') => {
                if self.trailer_lines >= MAX_TRAILERS {
                    return malformed("more than 100 trailer fields");
                }
                self.trailer_lines += 1;
                self.keep(byte)?;
                State::EndCr
            }
            (State::TrailerLf, _) => return malformed("trailer line without CRLF"),
            (State::EndLf, b'\n') => {
                self.keep(byte)?;
                State::End
            }
            (State::EndLf, _) => return malformed("chunked body without its final CRLF"),
            (State::Data | State::End | State::Done, _) => self.state,
        })
    }

    /// Adds a byte to the trailer section, if it has begun. As hyper, a section that reaches
    /// the limit is refused: 16,383 bytes at most, its final CRLF counted.
    fn keep(&mut self, byte: u8) -> Result<(), Error> {
        if let Some(section) = &mut self.trailers {
            section.put_u8(byte);
            if section.len() >= TRAILERS_LIMIT {
                return Err(Error::Chunked("trailers over 16 KiB"));
            }
        }
        Ok(())
    }
}

/// The trailer section's fields (`lines` of them at most, as hyper parses it).
fn trailers(section: &[u8], lines: usize) -> Result<HeaderMap, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    let fields = match httparse::parse_headers(section, &mut slots[..lines.min(MAX_TRAILERS)]) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        Ok(httparse::Status::Partial) | Err(_) => return Err(Error::Chunked("malformed trailers")),
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Error::Chunked("trailer name"))?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| Error::Chunked("trailer value"))?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed `step` bytes at a time: the data and trailers.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let (mut decoder, mut read, mut fed) = (Decoder::default(), BytesMut::new(), 0);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            match decoder.decode(&mut read)? {
                Decoded::Frame(frame) => match frame.into_data() {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Decoded::End => break,
                Decoded::More if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    read.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                Decoded::More => return Err(Error::Incomplete),
            }
        }
        assert!(read.is_empty(), "bytes left after the body: {read:?}");
        Ok((data, trailers))
    }

    #[test]
    fn chunked_bodies_are_read_whole_however_they_arrive() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (data, trailers) = dechunk(wire, step).unwrap();
            assert_eq!((data.as_slice(), trailers), (&b"hello, world"[..], None), "fed {step} at a time");
        }
        let (data, trailers) = dechunk(b"A\r\n0123456789\r\n0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n", 4).unwrap();
        let trailers = trailers.expect("trailers");
        assert_eq!(
            (data.len(), trailers["grpc-status"].as_bytes(), trailers["x-b"].as_bytes()),
            (10, &b"0"[..], &b"2"[..])
        );
        let (data, _) = dechunk(b"0005 \t;name=\"v\"\r\nhello\r\n0\r\n\r\n", 3).unwrap();
        assert_eq!(data, b"hello", "leading zeros, whitespace before an extension");
        let long_line = format!("{}1;{}\r\nx\r\n0\r\n\r\n", "0".repeat(20_000), "e".repeat(10_000));
        assert_eq!(
            dechunk(long_line.as_bytes(), 1).unwrap().0,
            b"x",
            "as hyper: no limit on a line, only on extensions"
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"\r\n",
            b"3\r\nabc\r\n0\r\nbad header\r\n\r\n",
            // As hyper rejects them: leading whitespace, other whitespace, a bare CR or LF.
            b"  5\r\nhello\r\n0\r\n\r\n",
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\n\n",
            b"3\r\nabc\r\n0\r\nx: y\n\r\n",
            b"FFFFFFFFFFFFFFFFF\r\n",
        ] {
            assert!(dechunk(wire, 3).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        assert!(matches!(dechunk(b"5\r\nhel", 2), Err(Error::Incomplete)));
        let many_extensions = format!("1;{}\r\nx\r\n", "e".repeat(1000)).repeat(20) + "0\r\n\r\n";
        assert!(dechunk(many_extensions.as_bytes(), 1 << 20).is_err(), "extensions past 16 KiB in all");
        let many_trailers = format!("0\r\n{}\r\n", "x: y\r\n".repeat(101));
        assert!(dechunk(many_trailers.as_bytes(), 1 << 20).is_err(), "101 trailer fields");
        let large_trailers = format!("0\r\nx: {}\r\n\r\n", "y".repeat(TRAILERS_LIMIT));
        assert!(dechunk(large_trailers.as_bytes(), 1 << 20).is_err(), "trailers past 16 KiB");
        // The section "x: " + value + CRLF CRLF: 16,383 bytes pass, 16,384 do not (as hyper).
        let section = |len: usize| format!("0\r\nx: {}\r\n\r\n", "y".repeat(len - 7));
        assert!(dechunk(section(TRAILERS_LIMIT - 1).as_bytes(), 1 << 20).is_ok(), "16,383 bytes");
        assert!(dechunk(section(TRAILERS_LIMIT).as_bytes(), 1 << 20).is_err(), "16,384 bytes");
    }

    #[test]
    fn trailer_lines_end_at_crlf_as_hyper_reads_them() {
        // A bare LF inside a trailer line does not end it; httparse then reads the section.
        let (_, trailers) = dechunk(b"0\r\nx: y\n\r\n\r\n", 1).unwrap();
        assert_eq!(trailers.expect("trailers")["x"], "y");
        assert!(dechunk(b"0\r\nx: y\nz: w\r\n\r\n", 1).is_err(), "two fields on one counted line");
    }
}
