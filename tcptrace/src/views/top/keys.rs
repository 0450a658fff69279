//! The keys of `tcptrace top`: sorting, the port filter's prompt, quitting. Pure: a key and
//! the board in, what to do out.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::model::{Board, SortKey};

/// The most digits a port has.
const PORT_DIGITS_MAX: usize = 5;

/// What a key asks of the screen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing changed.
    None,
    /// Draw again (the sort, the filter or the prompt changed).
    Redraw,
    /// Leave.
    Quit,
}

/// The state of the keyboard: the port filter's prompt while it is open, and what the last
/// entry said when it was not a port.
#[derive(Clone, Debug, Default)]
pub struct Keys {
    prompt: Option<String>,
    complaint: Option<String>,
}

impl Keys {
    /// The digits typed so far while the filter's prompt is open.
    pub fn prompt(&self) -> Option<&str> {
        self.prompt.as_deref()
    }

    /// Why the last filter entered was refused.
    pub fn complaint(&self) -> Option<&str> {
        self.complaint.as_deref()
    }

    /// Acts on one key.
    pub fn press(&mut self, key: KeyEvent, board: &mut Board) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        match self.prompt.take() {
            Some(typed) => self.edit(typed, key.code, board),
            None => self.command(key.code, board),
        }
    }

    fn command(&mut self, code: KeyCode, board: &mut Board) -> Action {
        let sort = match code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('/' | 'f') => {
                self.prompt = Some(String::new());
                self.complaint = None;
                return Action::Redraw;
            }
            KeyCode::Char('c') => SortKey::Closes,
            KeyCode::Char('t') => SortKey::TimeWait,
            KeyCode::Char('r') => SortKey::Resets,
            KeyCode::Char('p') => SortKey::Port,
            _ => return Action::None,
        };
        board.sort_by(sort);
        Action::Redraw
    }

    /// A key while the prompt is open (`typed` so far): digits, Backspace, Enter, Esc.
    fn edit(&mut self, mut typed: String, code: KeyCode, board: &mut Board) -> Action {
        match code {
            KeyCode::Char(d) if d.is_ascii_digit() && typed.len() < PORT_DIGITS_MAX => {
                typed.push(d)
            }
            KeyCode::Backspace => {
                typed.pop();
            }
            KeyCode::Enter => {
                self.apply(&typed, board);
                return Action::Redraw;
            }
            KeyCode::Esc => return Action::Redraw,
            _ => {}
        }
        self.prompt = Some(typed);
        Action::Redraw
    }

    /// Filters on the port typed; nothing typed shows every port again.
    fn apply(&mut self, typed: &str, board: &mut Board) {
        if typed.is_empty() {
            board.filter_port(None);
            return;
        }
        match typed.parse::<u16>() {
            Ok(port) if port > 0 => board.filter_port(Some(port)),
            _ => self.complaint = Some(format!("{typed} is not a port (1-65535)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn typed(keys: &mut Keys, board: &mut Board, text: &str) {
        for c in text.chars() {
            keys.press(key(KeyCode::Char(c)), board);
        }
    }

    #[test]
    fn sort_keys_change_the_order_and_q_or_ctrl_c_quit() {
        let (mut keys, mut board) = (Keys::default(), Board::new());
        assert_eq!(
            board.sort_key(),
            SortKey::TimeWait,
            "TIME_WAIT first by default"
        );
        for (c, sort) in [
            ('c', SortKey::Closes),
            ('r', SortKey::Resets),
            ('p', SortKey::Port),
            ('t', SortKey::TimeWait),
        ] {
            assert_eq!(
                keys.press(key(KeyCode::Char(c)), &mut board),
                Action::Redraw
            );
            assert_eq!(board.sort_key(), sort);
        }
        assert_eq!(
            keys.press(key(KeyCode::Char('x')), &mut board),
            Action::None
        );
        assert_eq!(
            keys.press(key(KeyCode::Char('q')), &mut board),
            Action::Quit
        );
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(keys.press(ctrl_c, &mut board), Action::Quit);
    }

    #[test]
    fn the_filter_prompt_takes_digits_until_enter_and_esc_cancels() {
        let (mut keys, mut board) = (Keys::default(), Board::new());
        keys.press(key(KeyCode::Char('/')), &mut board);
        typed(&mut keys, &mut board, "80a8x");
        assert_eq!(keys.prompt(), Some("808"), "only digits");
        keys.press(key(KeyCode::Backspace), &mut board);
        typed(&mut keys, &mut board, "80");
        assert_eq!(board.sort_key(), SortKey::TimeWait, "typing is not sorting");
        keys.press(key(KeyCode::Enter), &mut board);
        assert_eq!((keys.prompt(), board.port_filter()), (None, Some(8080)));
        keys.press(key(KeyCode::Char('f')), &mut board);
        typed(&mut keys, &mut board, "99");
        keys.press(key(KeyCode::Esc), &mut board);
        assert_eq!(board.port_filter(), Some(8080), "Esc keeps the filter");
        keys.press(key(KeyCode::Char('f')), &mut board);
        typed(&mut keys, &mut board, "700000");
        keys.press(key(KeyCode::Enter), &mut board);
        assert_eq!(keys.complaint(), Some("70000 is not a port (1-65535)"));
        assert_eq!(board.port_filter(), Some(8080));
        keys.press(key(KeyCode::Char('/')), &mut board);
        keys.press(key(KeyCode::Enter), &mut board);
        assert_eq!(
            board.port_filter(),
            None,
            "an empty filter shows every port"
        );
    }
}
