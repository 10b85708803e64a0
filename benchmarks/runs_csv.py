""" A benchmark's runs as CSV rows: read when it starts, one row appended as each run finishes, so that a rerun
continues where the last one stopped. """
import csv
from pathlib import Path


class RunsCSV:
    def __init__(self, path, fields):
        self.path, self.fields = Path(path), fields
        self.rows = []
        if self.path.is_file():
            with open(self.path) as f:
                self.rows = list(csv.DictReader(f))

    def append(self, row: dict):
        """ Write `row` to the file and keep it in `rows` as it reads back (values as strings). """
        new = not self.path.is_file()
        with open(self.path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.rows.append({k: str(v) for k, v in row.items()})
