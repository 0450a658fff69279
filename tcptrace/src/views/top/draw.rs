//! Draws the board with ratatui: a header of totals, the table of rows, the TIME_WAIT
//! population by age, the most pressed destinations, and a footer of keys (or the filter's prompt).

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style, Stylize as _},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row as TableRow, Table},
};

use super::{
    keys::Keys,
    model::{AGE_BUCKET_LABELS, Board, PRESSED_KEPT, Pressed, Row, SortKey, direction, sparkline},
};
use crate::shared::NS_PER_SEC;

/// Cells of each row's TIME_WAIT sparkline.
const SPARK_CELLS: usize = 20;
/// Lines of the age pane: one per bucket, and its borders.
const AGES_PANE_LINES: u16 = AGE_BUCKET_LABELS.len() as u16 + 2;
/// Columns of the age pane before its bars: the label and the count.
const AGE_LABEL_COLUMNS: u16 = 16;

/// Lines of the pressed pane besides its rows: its borders and header.
const PRESSED_FRAME_LINES: u16 = 3;
/// Lines the rest of the screen needs at least: the header, the table's borders, header and
/// two rows, the age pane, the footer.
const OTHER_LINES_MIN: u16 = 1 + 5 + AGES_PANE_LINES + 1;

/// What turns the board's monotonic time into a wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock {
    /// CLOCK_REALTIME − CLOCK_MONOTONIC.
    pub wall_offset_ns: i64,
    /// The local time zone's offset from UTC.
    pub utc_offset_secs: i32,
}

impl Clock {
    /// `HH:MM:SS` local time of a monotonic instant.
    fn time_of_day(self, monotonic_ns: u64) -> String {
        let unix_s = (i128::from(monotonic_ns) + i128::from(self.wall_offset_ns))
            .div_euclid(i128::from(NS_PER_SEC))
            + i128::from(self.utc_offset_secs);
        let day_s = unix_s.rem_euclid(86_400);
        format!(
            "{:02}:{:02}:{:02}",
            day_s / 3_600,
            day_s / 60 % 60,
            day_s % 60
        )
    }
}

/// Draws everything into `frame`.
pub fn draw(frame: &mut Frame, board: &Board, keys: &Keys, clock: Clock) {
    let shown = pressed_shown(board, frame.area().height);
    let [header, table, ages, pressed, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(AGES_PANE_LINES),
        Constraint::Length(shown as u16 + PRESSED_FRAME_LINES),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(header_line(board, clock), header);
    frame.render_widget(rows_table(board), table);
    draw_ages(frame, board, ages);
    frame.render_widget(pressed_table(&board.pressed()[..shown]), pressed);
    frame.render_widget(footer_line(board, keys), footer);
}

fn header_line(board: &Board, clock: Clock) -> Paragraph<'static> {
    let t = board.totals();
    let mut spans = vec![
        Span::from("tcptrace top").bold(),
        Span::from(format!(
            "  {}  closes {:.1}/s ({} total)  TIME_WAIT {}  resets {}  ",
            clock.time_of_day(t.now_ns),
            t.closes_per_s,
            t.closed,
            t.timewait,
            t.resets
        )),
    ];
    let lost = format!("lost {}", t.lost);
    spans.push(if t.lost > 0 {
        Span::from(format!("{lost} (counts are low)")).red().bold()
    } else {
        Span::from(lost)
    });
    Paragraph::new(Line::from(spans))
}

/// The headers, each with the key that sorts by it.
const COLUMNS: [(&str, Option<SortKey>); 9] = [
    ("PORT", Some(SortKey::Port)),
    ("DIR", None),
    ("CLOSES/s", Some(SortKey::Closes)),
    ("CLOSED", None),
    ("LOCAL", None),
    ("REMOTE", None),
    ("RESETS", Some(SortKey::Resets)),
    ("TIME_WAIT", Some(SortKey::TimeWait)),
    ("TREND 1m", None),
];

/// The columns of numbers, aligned right.
const NUMERIC_COLUMNS: std::ops::Range<usize> = 2..8;

const WIDTHS: [Constraint; 9] = [
    Constraint::Length(7),
    Constraint::Length(4),
    Constraint::Length(9),
    Constraint::Length(8),
    Constraint::Length(6),
    Constraint::Length(6),
    Constraint::Length(7),
    Constraint::Length(9),
    Constraint::Length(SPARK_CELLS as u16 + 2),
];

fn rows_table(board: &Board) -> Table<'static> {
    let sorted = board.sort_key();
    let header = TableRow::new(COLUMNS.iter().enumerate().map(|(i, &(name, key))| {
        let line = Line::from(name);
        let cell = Cell::from(if NUMERIC_COLUMNS.contains(&i) {
            line.right_aligned()
        } else {
            line
        });
        if key == Some(sorted) {
            cell.style(Style::new().add_modifier(Modifier::REVERSED))
        } else {
            cell
        }
    }))
    .bold();
    let title = match board.port_filter() {
        Some(p) => format!(
            " per service port and direction, sorted by {} — :{p} only ",
            sorted.name()
        ),
        None => format!(
            " per service port and direction, sorted by {} ",
            sorted.name()
        ),
    };
    Table::new(board.rows().iter().map(table_row), WIDTHS)
        .header(header)
        .block(Block::bordered().title(title))
}

fn table_row(r: &Row) -> TableRow<'static> {
    let share = |n: u64| {
        (n * 100)
            .checked_div(r.closed)
            .map_or_else(|| "-".to_string(), |p| format!("{p}%"))
    };
    let right = |s: String| Cell::from(Line::from(s).right_aligned());
    TableRow::new([
        Cell::from(format!(":{}", r.port)),
        Cell::from(r.way.name()),
        right(format!("{:.1}", r.closes_per_s)),
        right(r.closed.to_string()),
        right(share(r.local)),
        right(share(r.remote)),
        right(r.resets.to_string()),
        right(r.timewait.to_string()),
        Cell::from(format!(
            "{} {}",
            sparkline(&r.trend, SPARK_CELLS),
            direction(&r.trend).arrow()
        )),
    ])
}

fn draw_ages(frame: &mut Frame, board: &Board, area: Rect) {
    let ages = board.ages();
    let most = ages.iter().copied().max().unwrap_or(0).max(1);
    let bar_room = u64::from(area.width.saturating_sub(AGE_LABEL_COLUMNS + 2));
    let lines: Vec<Line> = AGE_BUCKET_LABELS
        .iter()
        .zip(ages)
        .map(|(label, n)| {
            let bar = "█".repeat((n * bar_room / most) as usize);
            Line::from(vec![
                Span::from(format!("{label:<7}{n:>8} ")),
                Span::from(bar).cyan(),
            ])
        })
        .collect();
    let block = Block::bordered().title(" TIME_WAIT held, by age ");
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

/// How many pressed destinations the pane shows on a screen of `lines`: those there are,
/// at least one line (empty, or a row), as many as fit beside the rest.
fn pressed_shown(board: &Board, lines: u16) -> usize {
    let room = lines.saturating_sub(OTHER_LINES_MIN + PRESSED_FRAME_LINES);
    board
        .pressed()
        .len()
        .min(PRESSED_KEPT)
        .min(usize::from(room.max(1)))
}

/// The pressed pane's headers, as `tcptrace ports` names its columns (and the peak).
const PRESSED_COLUMNS: [&str; 8] = [
    "DESTINATION (from)",
    "IN_USE/AVAIL",
    "TIME_WAIT",
    "USAGE",
    "PEAK",
    "CONN/s",
    "FAILED",
    "EXHAUSTION",
];

const PRESSED_WIDTHS: [Constraint; 8] = [
    Constraint::Min(30),
    Constraint::Length(12),
    Constraint::Length(9),
    Constraint::Length(6),
    Constraint::Length(6),
    Constraint::Length(8),
    Constraint::Length(7),
    Constraint::Length(10),
];

fn pressed_table(pressed: &[Pressed]) -> Table<'static> {
    let header = TableRow::new(PRESSED_COLUMNS.iter().enumerate().map(|(i, name)| {
        let line = Line::from(*name);
        Cell::from(if i == 0 { line } else { line.right_aligned() })
    }))
    .bold();
    let title = " most pressed destinations: local ports held of those a connect can choose ";
    Table::new(pressed.iter().map(pressed_row), PRESSED_WIDTHS)
        .header(header)
        .block(Block::bordered().title(title))
}

fn pressed_row(p: &Pressed) -> TableRow<'static> {
    let r = &p.row;
    let right = |s: String| Cell::from(Line::from(s).right_aligned());
    TableRow::new([
        Cell::from(r.destination()),
        right(format!("{}/{}", r.in_use, r.available)),
        right(r.timewait.to_string()),
        right(format!("{:.1}%", r.usage * 100.0)),
        right(format!("{:.1}%", p.peak_usage * 100.0)),
        right(format!("{:.1}", r.connects_per_s)),
        right(r.failures.to_string()),
        right(r.exhaustion()),
    ])
}

fn footer_line(board: &Board, keys: &Keys) -> Paragraph<'static> {
    if let Some(typed) = keys.prompt() {
        return Paragraph::new(format!(
            "filter by port: {typed}_   (Enter applies, empty shows every port; Esc cancels)"
        ))
        .reversed();
    }
    let mut text =
        String::from("c closes/s  t TIME_WAIT  r resets  p port  / or f filter by port  q quit");
    if let Some(p) = board.port_filter() {
        text.push_str(&format!("   [filter :{p}]"));
    }
    if let Some(why) = keys.complaint() {
        text.push_str(&format!("   {why}"));
    }
    Paragraph::new(text)
}
