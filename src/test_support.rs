//! Helpers shared by unit tests.

use tokio::net::{TcpListener, TcpStream};

/// Two ends of a loopback TCP connection: (the connecting one, the accepted one).
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    (near, listener.accept().await.unwrap().0)
}
