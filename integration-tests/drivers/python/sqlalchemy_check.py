"""SQLAlchemy 2 ORM (psycopg 3 driver) check of pgrouter's real-driver matrix.

Covers: declarative models with a one-to-many relationship and a unique constraint,
create_all, sessions with add/commit, joins, selectinload/joinedload, aggregate queries,
bulk update and delete, rollback after an IntegrityError, a transaction that rolls back
leaving nothing, a nested transaction (savepoint), and 12 concurrent sessions on a QueuePool
of 12 connections (psycopg auto-prepares repeated statements). Prints deterministic lines.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from sqlalchemy import ForeignKey, Numeric, String, UniqueConstraint, create_engine, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, joinedload, mapped_column, relationship, selectinload
from sqlalchemy.engine import make_url

WORKERS = 12


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    books: Mapped[list["Book"]] = relationship(back_populates="author", cascade="all, delete-orphan",
                                               order_by="Book.title")


class Book(Base):
    __tablename__ = "books"
    __table_args__ = (UniqueConstraint("author_id", "title", name="uq_book_author_title"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    price: Mapped[Decimal] = mapped_column(Numeric(8, 2))
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    worker: Mapped[int]
    label: Mapped[str] = mapped_column(String(50), unique=True)


def out(msg):
    print(f"sqlalchemy: {msg}", flush=True)


def make_engine():
    url = make_url(os.environ["PGROUTER_DSN"]).set(drivername="postgresql+psycopg")
    return create_engine(url, pool_size=WORKERS, max_overflow=0, pool_timeout=60,
                         connect_args={"prepare_threshold": 2})


def populate(engine):
    with Session(engine) as s:
        for a in range(1, 6):
            author = Author(name=f"Author {a}")
            author.books = [Book(title=f"Book {a}-{b}", price=Decimal(a * 10 + b) / 4) for b in range(1, a + 3)]
            s.add(author)
        s.commit()
        n_books = s.scalar(select(func.count(Book.id)))
        out(f"create_all + populate authors={s.scalar(select(func.count(Author.id)))} books={n_books}")


def queries(engine):
    with Session(engine) as s:
        rows = s.execute(select(Author.name, func.count(Book.id), func.sum(Book.price))
                         .join(Book).group_by(Author.name).order_by(Author.name)).all()
        for name, n, total in rows:
            out(f"join {name} books={n} total={total}")
        authors = s.scalars(select(Author).options(selectinload(Author.books)).order_by(Author.id)).all()
        sel = [f"{a.name}:{len(a.books)}" for a in authors]
        books = s.scalars(select(Book).options(joinedload(Book.author)).where(Book.price > 10)
                          .order_by(Book.price.desc(), Book.title)).all()
        joined = [f"{b.title}/{b.author.name}" for b in books[:3]]
        cheapest = s.execute(select(Book.title).where(Book.author.has(Author.name == "Author 3"))
                             .order_by(Book.price).limit(1)).scalar_one()
        out(f"selectinload {' '.join(sel)}")
        out(f"joinedload expensive={len(books)} top3={joined} cheapest_a3={cheapest}")


def modify(engine):
    with Session(engine) as s:
        res = s.execute(update(Book).where(Book.author_id == select(Author.id).where(Author.name == "Author 2")
                                           .scalar_subquery()).values(price=Book.price + 1))
        updated = res.rowcount
        a5 = s.scalars(select(Author).where(Author.name == "Author 5")).one()
        a5.books[0].title = "Book 5-1 (revised)"
        s.commit()
        res = s.execute(delete(Book).where(Book.title.like("Book 4-%"), Book.price < 11))
        deleted = res.rowcount
        a1 = s.scalars(select(Author).where(Author.name == "Author 1")).one()
        s.delete(a1)  # cascades to its books
        s.commit()
        left = s.scalar(select(func.count(Book.id)))
        titles = s.scalars(select(Book.title).join(Author).where(Author.name == "Author 5").order_by(Book.title)).all()
        out(f"update rows={updated} delete rows={deleted} books_left={left} a5={','.join(titles)}")


def rollbacks(engine):
    with Session(engine) as s:
        s.add(Author(name="Author 2"))
        try:
            s.commit()
            raise AssertionError("duplicate author accepted")
        except IntegrityError as e:
            s.rollback()
            first = e.orig.sqlstate
        a2 = s.scalars(select(Author).where(Author.name == "Author 2")).one()
        s.add(Book(title="Book 2-1", price=Decimal(1), author=a2))
        try:
            s.flush()
            raise AssertionError("duplicate book accepted")
        except IntegrityError as e:
            s.rollback()
            second = e.orig.diag.constraint_name
        s.add(Author(name="Ghost", books=[Book(title="Never", price=Decimal(1))]))
        s.flush()
        assert s.scalar(select(func.count(Author.id)).where(Author.name == "Ghost")) == 1
        s.rollback()
        ghosts = s.scalar(select(func.count(Author.id)).where(Author.name == "Ghost"))
        s.commit()
        nested_ok = None
        with s.begin():
            s.add(Author(name="Author 6"))
            try:
                with s.begin_nested():
                    s.add(Author(name="Author 3"))
            except IntegrityError as e:
                nested_ok = e.orig.sqlstate
        names = s.scalars(select(Author.name).order_by(Author.name)).all()
        s.commit()
        assert ghosts == 0 and "Author 6" in names
        out(f"rollback unique={first} constraint={second} ghosts={ghosts} savepoint={nested_ok} authors={len(names)}")
    with engine.begin() as conn:  # core connection, transaction rolled back by exception
        try:
            with conn.begin_nested():
                conn.execute(text("insert into tags (worker, label) values (:w, :l)"), {"w": -1, "l": "gone"})
                raise RuntimeError("abort")
        except RuntimeError:
            pass
        n = conn.execute(text("select count(*) from tags")).scalar_one()
    out(f"core nested rollback tags={n}")


def worker(engine, w):
    with Session(engine) as s:
        for tx in range(5):
            with s.begin():
                s.execute(text("select set_config('statement_timeout', :t, true)"), {"t": f"{20 + w}s"})
                s.add_all([Tag(worker=w, label=f"w{w}-t{tx}-{k}") for k in range(4)])
                s.flush()
                st = s.scalar(text("select current_setting('statement_timeout')"))
                mine = s.scalar(select(func.count(Tag.id)).where(Tag.worker == w))
                assert st == f"{20 + w}s" and mine == (tx + 1) * 4, (w, tx, st, mine)
            try:
                with s.begin():
                    s.add(Tag(worker=w, label=f"w{w}-t{tx}-0"))
                raise AssertionError("duplicate tag accepted")
            except IntegrityError:
                pass
        labels = s.scalars(select(Tag.label).where(Tag.worker == w).order_by(Tag.label)).all()
        book = s.scalars(select(Book).options(joinedload(Book.author)).order_by(Book.title).offset(w % 5).limit(1)).one()
        desc = f"{book.title}/{book.author.name}"
        s.rollback()
    return f"worker {w:02d} tags={len(labels)} first={labels[0]} last={labels[-1]} book={desc}"


def main():
    engine = make_engine()
    Base.metadata.create_all(engine)
    populate(engine)
    queries(engine)
    modify(engine)
    rollbacks(engine)
    with ThreadPoolExecutor(WORKERS) as ex:
        results = list(ex.map(lambda w: worker(engine, w), range(WORKERS)))
    for line in sorted(results):
        out(line)
    with engine.connect() as conn:
        total = conn.execute(text("select count(*), count(distinct worker) from tags")).one()
    out(f"tags total={total[0]} workers={total[1]}")
    engine.dispose()
    out("ok")


if __name__ == "__main__":
    main()
