"""Drain N messages from a queue with pika, the way most Python services
consume: a BlockingConnection, basic_qos, and basic_ack per message.

Usage: python3 pika_drain.py QUEUE N [PREFETCH]
Prints the seconds the drain took on stdout.
"""

import sys
import time

import pika


def main() -> None:
    queue, n = sys.argv[1], int(sys.argv[2])
    prefetch = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    url = sys.argv[4] if len(sys.argv) > 4 else "amqp://guest:guest@127.0.0.1:5672/%2f"
    params = pika.URLParameters(url)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=prefetch)
    got = 0
    started = time.perf_counter()

    def on_message(channel, method, _properties, _body):
        nonlocal got
        channel.basic_ack(delivery_tag=method.delivery_tag)
        got += 1
        if got >= n:
            channel.stop_consuming()

    ch.basic_consume(queue=queue, on_message_callback=on_message)
    ch.start_consuming()
    elapsed = time.perf_counter() - started
    conn.close()
    print(f"{elapsed:.6f}")


if __name__ == "__main__":
    main()
