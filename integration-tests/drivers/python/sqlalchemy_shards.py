"""SQLAlchemy 2 ORM (psycopg 3) on a database with two shards, through pgrouter.

customers and orders are both sharded by customer_id, so a customer's orders live on the
customer's shard (the foreign key holds on each shard). The script:
- creates the schema with create_all() (its DDL runs in a transaction),
- adds each customer with its orders in one ORM transaction (one shard each),
- inserts customers and orders with mixed keys as one multi-row INSERT each, outside a
  transaction (pgrouter splits them between the shards), RETURNING in the order sent,
- reads each customer's orders by customer_id, and counts across shards,
- sends the key as $1 in text (%t) and in binary (%b) format.
It checks every result itself and prints deterministic lines; the Rust test checks the rows
directly on each shard.
"""
import os
from decimal import Decimal

from sqlalchemy import BigInteger, ForeignKeyConstraint, Integer, Numeric, String, create_engine, func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (ForeignKeyConstraint(["customer_id"], ["customers.customer_id"]),)
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    order_no: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))


def out(msg):
    print(f"sqlalchemy-shards: {msg}", flush=True)


def amount(cid, n):
    return Decimal(cid * 10 + n) / 4


def main():
    url = make_url(os.environ["PGROUTER_DSN"]).set(drivername="postgresql+psycopg")
    engine = create_engine(url, pool_size=4, max_overflow=0)
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    Base.metadata.create_all(engine)
    out("create_all: customers, orders")

    for cid in range(1, 11):
        with Session(engine) as s, s.begin():
            s.add(Customer(customer_id=cid, name=f"c{cid}"))
            s.add_all([Order(customer_id=cid, order_no=n, amount=amount(cid, n)) for n in range(1, 4)])
    out("customers 1-10 with 3 orders each, one transaction per customer")

    with autocommit.connect() as conn:
        rows = [{"customer_id": cid, "name": f"c{cid}"} for cid in range(20, 10, -1)]
        returned = conn.scalars(insert(Customer).values(rows).returning(Customer.customer_id)).all()
        assert returned == list(range(20, 10, -1)), returned
        orders = [{"customer_id": cid, "order_no": n, "amount": amount(cid, n)} for cid in range(11, 21) for n in (1, 2)]
        returned = conn.execute(insert(Order).values(orders).returning(Order.customer_id, Order.order_no)).all()
        assert [tuple(r) for r in returned] == [(o["customer_id"], o["order_no"]) for o in orders], returned
    out("customers 11-20 and their 20 orders: one multi-row INSERT each, mixed keys")

    for cid in range(1, 21):
        with Session(engine) as s:
            customer = s.get(Customer, cid)
            orders = s.scalars(select(Order).where(Order.customer_id == cid).order_by(Order.order_no)).all()
            expected = [(n, amount(cid, n)) for n in (range(1, 4) if cid <= 10 else (1, 2))]
            assert customer.name == f"c{cid}", customer.name
            assert [(o.order_no, o.amount) for o in orders] == expected, (cid, orders)
            out(f"customer {cid}: {len(orders)} orders, total {sum(o.amount for o in orders)}")

    with Session(autocommit) as s:
        count, total = s.execute(select(func.count(), func.sum(Order.amount)).select_from(Order)).one()
        assert count == 50, count
        out(f"every shard: {count} orders, total {total}")

    with autocommit.connect() as conn:
        cur = conn.connection.driver_connection.cursor()
        for cid in (4, 5, 14):
            cur.execute("select count(*) from orders where customer_id = %t", (cid,))
            text_count = cur.fetchone()[0]
            cur.execute("select count(*) from orders where customer_id = %b", (cid,))
            binary_count = cur.fetchone()[0]
            assert text_count == binary_count == (3 if cid <= 10 else 2), (cid, text_count, binary_count)
            out(f"customer {cid} by $1 in text and binary format: {text_count} orders")
    engine.dispose()


if __name__ == "__main__":
    main()
