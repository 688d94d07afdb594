import os
from tests.fuse.conftest import MountDaemon


def test_smoke(mounted: MountDaemon) -> None:
    m = mounted.mnt
    print(os.listdir(m))
    (m / "a.txt").write_bytes(b"hello")
    assert (m / "a.txt").read_bytes() == b"hello"
    c = mounted.client()
    assert c.get_object(Bucket="e2e", Key="a.txt")["Body"].read() == b"hello"
    c.put_object(Bucket="e2e", Key="dir/b.txt", Body=b"world")
    assert (m / "dir" / "b.txt").read_bytes() == b"world"
    print(sorted(os.listdir(m)), os.stat(m / "a.txt"))
    os.mkdir(m / "x")
    os.rmdir(m / "x")
    os.unlink(m / "a.txt")
    print(sorted(os.listdir(m)))
