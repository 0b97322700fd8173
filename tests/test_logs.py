"""The non-blocking log writer batches the records of one event-loop pass into one write."""

from __future__ import annotations

import asyncio
import os

from proxy.logs import NonBlockingLineWriter


def test_records_of_one_loop_pass_go_out_in_one_write() -> None:
    read_fd, write_fd = os.pipe()
    try:
        writer = NonBlockingLineWriter(write_fd)
        writes: list[int] = []
        real = writer._write

        def counting(data: bytes | bytearray) -> int:
            writes.append(len(data))
            return real(data)

        writer._write = counting  # type: ignore[method-assign]

        async def one_pass() -> None:
            for i in range(3):
                writer.write_line(f'{{"n": {i}}}')
            assert writes == []  # nothing written yet: the pass is not over
            await asyncio.sleep(0)

        asyncio.run(one_pass())
        assert len(writes) == 1
        assert os.read(read_fd, 1000) == b'{"n": 0}\n{"n": 1}\n{"n": 2}\n'
        writer.write_line("outside a loop")  # written at once
        assert len(writes) == 2 and os.read(read_fd, 1000) == b"outside a loop\n"
    finally:
        os.close(read_fd)
        os.close(write_fd)
