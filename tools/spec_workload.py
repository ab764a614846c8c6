"""Copy-heavy chat prompts for tools/bench_spec.py: outputs that repeat spans of their input, the
work n-gram speculation is for. Three kinds, three variants each (built here, not drawn, so every
run measures the same prompts):
  rename   rewrite a short Python function with one identifier renamed;
  passage  answer a question by quoting from a given passage;
  json     re-format a compact JSON object with indentation.
"""

from __future__ import annotations

import json

_CODE = [
    ("items", "records", '''def summarize(items, limit=10):
    """Return the count, total and the largest values of items."""
    total = 0
    largest = []
    for value in items:
        total += value
        largest.append(value)
        largest.sort(reverse=True)
        largest = largest[:limit]
    count = len(items)
    mean = total / count if count else 0.0
    return {"count": count, "total": total, "mean": mean, "largest": largest}
'''),
    ("conn", "connection", '''def fetch_users(conn, active_only=True):
    cursor = conn.cursor()
    query = "SELECT id, name, email FROM users"
    if active_only:
        query += " WHERE active = 1"
    cursor.execute(query)
    rows = cursor.fetchall()
    conn.commit()
    users = [{"id": r[0], "name": r[1], "email": r[2]} for r in rows]
    cursor.close()
    return users
'''),
    ("buf", "buffer", '''class LineReader:
    def __init__(self, stream):
        self.stream = stream
        self.buf = ""

    def read_line(self):
        while "\\n" not in self.buf:
            chunk = self.stream.read(1024)
            if not chunk:
                line, self.buf = self.buf, ""
                return line
            self.buf += chunk
        line, self.buf = self.buf.split("\\n", 1)
        return line
'''),
]

_PASSAGES = [
    ("The Amazon River flows through Brazil, Peru and Colombia before reaching the Atlantic "
     "Ocean. It carries more water than any other river in the world, about one fifth of all "
     "river water that flows into the oceans. The river is about 6,400 kilometres long. Its "
     "basin covers around seven million square kilometres, most of it tropical rainforest.",
     "How much of the world's river water does the Amazon carry into the oceans?"),
    ("The first practical telephone was patented by Alexander Graham Bell in 1876. Bell had been "
     "working on ways to send several telegraph messages over a single wire. His assistant, "
     "Thomas Watson, heard the first words spoken over the device: Mr. Watson, come here, I want "
     "to see you. Within a decade, more than one hundred thousand people owned a telephone.",
     "What were the first words spoken over the telephone?"),
    ("Honey bees communicate the location of food with a waggle dance. The angle of the dance "
     "relative to the vertical shows the direction of the food relative to the sun. The length "
     "of the waggle run tells the other bees how far away the food is. A colony can hold up to "
     "sixty thousand bees in summer, but only a few thousand survive the winter.",
     "How do honey bees tell each other how far away the food is?"),
]

_RECORDS = [
    {"id": 1042, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["admin", "dev"],
     "active": True, "address": {"city": "London", "zip": "NW1 6XE"}},
    {"order": "A-7731", "items": [{"sku": "KB-01", "qty": 2, "price": 49.5},
                                  {"sku": "MS-22", "qty": 1, "price": 19.99}],
     "currency": "EUR", "paid": False},
    {"station": "Oslo-Blindern", "date": "2024-03-01", "readings": [
        {"hour": 6, "temp_c": -4.2}, {"hour": 12, "temp_c": 1.8}, {"hour": 18, "temp_c": -0.5}]},
]


def spec_conversations() -> list[tuple[str, list[dict]]]:
    """(kind, one user message) for each prompt of the workload."""
    out = []
    for old, new, code in _CODE:
        out.append(("rename", [{"role": "user", "content":
                    f"Rewrite this Python code with `{old}` renamed to `{new}`. Change nothing "
                    f"else and reply with the code only.\n\n```python\n{code}```"}]))
    for passage, question in _PASSAGES:
        out.append(("passage", [{"role": "user", "content":
                    f"Read the passage and answer the question by quoting the sentence that "
                    f"answers it.\n\nPassage: {passage}\n\nQuestion: {question}"}]))
    for record in _RECORDS:
        out.append(("json", [{"role": "user", "content":
                    "Re-format this JSON with two-space indentation and the same keys and "
                    f"values. Reply with the JSON only.\n\n{json.dumps(record)}"}]))
    return out
